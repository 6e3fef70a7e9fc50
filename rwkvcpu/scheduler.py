"""Continuous batching: one loop that owns the model and steps every live sequence together.

Requests join and leave between steps. Each step (`Scheduler.run_once`) runs, in
one `Model.step`, every sequence that decodes (one token each) and chunks of the
prompts still being read, within a per-step budget of prompt tokens, so that a
long prompt never stalls the streams already decoding. Tokens are sampled per
sequence (rwkvcpu.sampling.Sampler) and turned into text (generate.Detokenizer)
exactly as `model.generate` does, and handed back per request as events, to a
thread (iterate the Handle) or to an asyncio loop (`async for`). A cancelled
request gives its slot back before the next step. A bounded queue answers
overload with QueueFullError rather than growing.

With a StateCache, the states at the prompt boundaries a request names (after a
system prompt, after each chat turn) are kept, and a request resumes from the
longest cached prefix of its prompt. `n > 1` choices read the prompt once and
fork its state.

The layers stay apart: the engine (Model.step over a StatePool) knows no
threads; this module knows no HTTP (rwkvcpu.server translates).

Example:
    >>> scheduler = Scheduler(model, max_batch=8).start()
    >>> handle = scheduler.submit(Request(model.tokenizer.encode("Once upon a time"),
    ...                                   SamplingParams(max_tokens=20, seed=1)))
    >>> for event in handle:
    ...     if isinstance(event, Token):
    ...         print(event.text, end="")
    >>> scheduler.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import InvalidArgumentError, RwkvCpuError
from .generate import Detokenizer, model_tokenizer
from .sampling import Sampler, SamplingParams

log = logging.getLogger("rwkvcpu.scheduler")

# Defaults (flags of `rwkvcpu serve`). From the 2-core figures of benchmarks/RESULTS.md's quiet run: v7-0.4b
# int8 decodes a token in ~25 ms and reads a prompt at ~190 tokens/s (v7-0.1b: 7 ms, ~500 tokens/s).
# A budget of 64 prompt tokens per step holds the streams already decoding to ~0.35 s (0.4b) / ~0.13 s
# (0.1b) per token while a prompt is read, where 256 would stall them 1.4 s / 0.5 s; and a 2,000-token
# prompt takes 32 steps instead of 8, which costs it ~5% more time to its first token (the decode part
# of the extra steps). bench_serve.py's step table ("what the defaults rest on") shows the trade on the
# machine at hand. 8 sequences: the design point; 8 states of v7-0.4b are 52 MB.
DEFAULT_MAX_BATCH = 8          # sequences stepping together (and state slots)
DEFAULT_PREFILL_BUDGET = 64    # prompt tokens read per step, over all sequences
DEFAULT_MAX_QUEUE = 64         # requests waiting for a slot, once all are taken, before new ones are refused

# At most this many alternatives per token with logprobs (OpenAI's limit for top_logprobs).
MAX_TOP_LOGPROBS = 20


class QueueFullError(RwkvCpuError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerStoppedError(RwkvCpuError):
    """The scheduler is stopped (or stopping) and takes no more requests."""


@dataclasses.dataclass
class Request:
    """What to generate, for Scheduler.submit.

    Attributes:
        prompt: the prompt's token ids (not empty).
        params: sampling, stop strings and tokens, max_tokens, seed.
        n: choices to generate from the one prompt (its state is read once and forked).
        logprobs: None, or k >= 0: report each chosen token's log-probability and the
            k most likely alternatives (from the model's distribution, before sampling's changes).
        boundaries: prompt lengths after which the state is worth keeping in the cache
            (after a system prompt, after each chat turn, the whole prompt).
        close_turn: for chats: the reply's text -> the tokens the next request's prompt
            will hold for it; when set (and n == 1 and a cache is used), the state after
            prompt + those tokens is cached before the request finishes, so the next
            turn reads only its new message.
        strip_leading_space: the text starts at its first visible character (chat replies).
        logits_processors: callables (generated token ids, logits (V,) float32) -> None that
            change the logits in place before sampling, e.g. a mask of the tokens a
            constraint allows; applied to a copy, in order.
        constraint: a rwkvcpu.structured.Constraint (compiled once for the request): each
            choice follows it in its own state, which masks that choice's logits and
            ends it when the output is complete.
    """

    prompt: Sequence[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    n: int = 1
    logprobs: Optional[int] = None
    boundaries: Sequence[int] = ()
    close_turn: Optional[Callable[[str], list]] = None
    strip_leading_space: bool = False
    logits_processors: Sequence[Callable] = ()
    constraint: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token of choice `index` and the text it made safe to show.

    token is None for text released at the end (held back until then); logprob is
    the token's log-probability and top_logprobs [(token, logprob), ...] the most
    likely alternatives, when the request asked for logprobs."""

    index: int
    token: Optional[int]
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """Choice `index` is complete: finish_reason "stop" (stop string or token) or "length"."""

    index: int
    finish_reason: str
    completion_tokens: int
    stop_string: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request ended without completing (cancelled, shut down, or an internal error)."""

    message: str


class Observer:
    """Receives the scheduler's measurements (the server's metrics); every method is optional."""

    def on_step(self, sequences: int, decode_tokens: int, prefill_tokens: int, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_token_gap(self, seconds: float) -> None: ...
    def on_request_done(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None: ...
    def on_cache_lookup(self, hit: bool, tokens: int) -> None: ...


class Handle:
    """One submitted request: its events, its counts, and a way to cancel it.

    Iterate it (`for event in handle`, or `async for` when submitted with a loop)
    for Token, Finished (one per choice) and Failed events; it ends after the last
    choice finishes or a Failed event.

    Attributes:
        prompt_tokens: tokens in the prompt.
        cached_tokens: prompt tokens resumed from the state cache (set once admitted).
        completion_tokens: tokens sampled so far, over all choices.
        done: every choice finished, or the request failed or was cancelled.
    """

    def __init__(self, scheduler: "Scheduler", request: Request, loop: Optional[asyncio.AbstractEventLoop]):
        self.request = request
        self.prompt_tokens = len(request.prompt)
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.submitted = scheduler.clock()
        self.started: Optional[float] = None     # when it got a slot
        self.done = False
        self._reserved = 0                       # slots held for its forks (n > 1) until they are made
        self._scheduler = scheduler
        self._open = request.n
        self._loop = loop
        self._events = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop generating; the request's slots are given back before the next step. Safe from any thread."""
        self._scheduler._cancel(self)

    def _put(self, event) -> None:
        if isinstance(event, (Finished, Failed)):
            self._open = 0 if isinstance(event, Failed) else self._open - 1
            if self._open <= 0:
                self.done = True
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            # the loop is closed: nobody is listening any more
            pass

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this request was submitted with an asyncio loop: use `async for`")
        left = self.request.n
        while left:
            event = self._events.get()
            yield event
            if isinstance(event, Failed):
                return
            if isinstance(event, Finished):
                left -= 1

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this request was submitted without an asyncio loop: use a plain `for`")
        left = self.request.n
        while left:
            event = await self._events.get()
            yield event
            if isinstance(event, Failed):
                return
            if isinstance(event, Finished):
                left -= 1


# A sequence's phases: reading its prompt, generating, or (chat) feeding its reply as the next
# turn's prompt will hold it, for the cache.
PREFILL, DECODE, CLOSE = "prefill", "decode", "close"


class _Sequence:
    """One choice of one request, in a slot of the pool."""

    def __init__(self, handle: Handle, index: int, slot: int, sampler: Sampler, output: Detokenizer):
        self.handle = handle
        self.index = index
        self.slot = slot
        self.sampler = sampler
        self.output = output
        self.phase = PREFILL
        self.feed: np.ndarray = np.zeros(0, np.int64)   # the tokens to read in PREFILL/CLOSE
        self.pos = 0                                     # how many of them are read
        self.stops: list = []                            # positions where the state goes to the cache
        self.pending: Optional[int] = None               # sampled, not yet fed
        self.generated = 0
        self.last_token_at: Optional[float] = None
        self.close_key: Optional[np.ndarray] = None

    def demand(self) -> int:
        """Tokens to read before the next stop (a cache boundary or the end)."""
        end = self.feed.shape[0]
        for b in self.stops:
            if b > self.pos:
                end = min(end, b)
                break
        return end - self.pos


def share_budget(budget: int, demands: Sequence[int]) -> list:
    """Split `budget` tokens among sequences asking for `demands`, evenly (water-filling), the
    earliest first where it does not divide: no prompt waits while another takes everything.

    Example:
        >>> share_budget(64, [1000, 5, 1000])
        [30, 5, 29]
    """
    out = [0] * len(demands)
    left = budget
    open_ = [i for i, d in enumerate(demands) if d > 0]
    while left > 0 and open_:
        each = max(1, left // len(open_))
        for i in list(open_):
            give = min(each, demands[i] - out[i], left)
            out[i] += give
            left -= give
            if out[i] == demands[i]:
                open_.remove(i)
            if left == 0:
                break
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(V,) float64 log-probabilities of the logits."""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - math.log(np.exp(z).sum())


class Scheduler:
    """The loop that owns a model and serves requests by continuous batching.

    Args:
        model: a Model (anything with state_pool, step, config, tokenizer).
        max_batch: sequences that step together; also the number of state slots.
        prefill_budget: prompt tokens read per step, over all sequences.
        max_queue: requests that may wait for a slot when every slot is taken; more are
            refused (QueueFullError).
        cache: a StateCache, or None.
        observer: an Observer for measurements.
        clock: time source (seconds), for the measurements; tests pass a fake one.

    Run it on its own thread (`start` / `stop`), or call `run_once` yourself (tests).
    """

    def __init__(self, model, *, max_batch: int = DEFAULT_MAX_BATCH, prefill_budget: int = DEFAULT_PREFILL_BUDGET,
                 max_queue: int = DEFAULT_MAX_QUEUE, cache=None, observer: Optional[Observer] = None,
                 clock: Callable[[], float] = time.perf_counter):
        for name, value, low in (("max_batch", max_batch, 1), ("prefill_budget", prefill_budget, 1),
                                 ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget
        self.max_queue = max_queue
        self.cache = cache
        self.observer = observer or Observer()
        self.clock = clock
        self.tokenizer = model_tokenizer(model)
        self.vocab_size = model.config.vocab_size
        self.pool = model.state_pool(max_batch)
        self.steps = 0
        self._cond = threading.Condition()
        self._waiting: deque = deque()          # Handles not yet admitted
        self._cancelled: set = set()
        self._active: list = []                 # _Sequences, in arrival order
        self._reserved = 0                      # slots promised to forks of n > 1 requests
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._request_seconds = 1.0             # running mean of a request's time in a slot

    # ------------------------------------------------------------ clients' side

    def submit(self, request: Request, *, loop: Optional[asyncio.AbstractEventLoop] = None) -> Handle:
        """Queue a request; return its Handle at once.

        Args:
            request: what to generate.
            loop: deliver the events to this asyncio loop (`async for event in handle`);
                None: to a thread (`for event in handle`).

        Raises:
            InvalidArgumentError: an empty prompt, a token id outside the vocabulary,
                n or logprobs out of range, a constraint this model's tokenizer cannot serve.
            QueueFullError: every slot is taken and max_queue requests already wait
                (carries retry_after seconds).
            SchedulerStoppedError: the scheduler is stopping.
        """
        self._check(request)
        handle = Handle(self, request, loop)
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down")
            # Requests that will find a free slot at the next step do not count as queued.
            free = max(0, self.pool.free - self._reserved)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFullError(f"the server is busy: {len(self._waiting) - free} requests are waiting "
                                     f"for a free sequence; try again shortly", self.retry_after())
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def _check(self, request: Request) -> None:
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or prompt.shape[0] == 0:
            raise InvalidArgumentError("the prompt is empty: give at least one token")
        if prompt.dtype.kind not in "iu" or prompt.min() < 0 or prompt.max() >= self.vocab_size:
            raise InvalidArgumentError(f"prompt token ids must be integers in [0, {self.vocab_size - 1}]")
        n = request.n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch:
            raise InvalidArgumentError(f"n must be an integer from 1 to {self.max_batch} (this server's batch size), "
                                       f"got {n!r}")
        k = request.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise InvalidArgumentError(f"the number of top logprobs must be an integer from 0 to "
                                       f"{MAX_TOP_LOGPROBS}, got {k!r}")
        request.params.check_vocab(self.vocab_size)
        if request.constraint is not None:
            # compiled for this vocabulary here (once, kept by the Constraint): a constraint
            # the tokenizer cannot serve is refused on submit, not in the loop
            request.constraint.start(self.tokenizer, self.vocab_size)

    def retry_after(self) -> int:
        """Seconds after which a refused client may try again: the queue's length in mean request times."""
        waves = (len(self._waiting) + len(self._active)) / self.max_batch
        return max(1, min(60, math.ceil(waves * self._request_seconds)))

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            if not handle.done:
                self._cancelled.add(handle)
                self._cond.notify()

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in a slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences in slots."""
        return len(self._active)

    # ---------------------------------------------------------------- thread

    def start(self) -> "Scheduler":
        """Run the loop on a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rwkvcpu-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; requests still queued or running get a Failed event. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._fail_all("the server is shutting down")
        if self.cache is not None:
            self.cache.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active or self._cancelled):
                    self._cond.wait()
                if self._stopping:
                    return
            self.run_once()

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            handle._put(Failed(message))
        for handle in {s.handle for s in self._active}:
            self._drop(handle, message)

    # -------------------------------------------------------------- one step

    def run_once(self) -> bool:
        """Admit, drop the cancelled, run one step and hand out its tokens. Returns whether a step ran."""
        self._drop_cancelled()
        self._admit()
        work, batch = [], []
        for seq in self._active:
            if seq.phase == DECODE:
                work.append((seq, 1))
                batch.append((seq.slot, [seq.pending]))
        reading = [seq for seq in self._active if seq.phase != DECODE]
        decode_tokens = len(batch)
        for seq, chunk in zip(reading, share_budget(self.prefill_budget, [s.demand() for s in reading])):
            if chunk:
                work.append((seq, chunk))
                batch.append((seq.slot, seq.feed[seq.pos:seq.pos + chunk]))
        if not batch:
            return False
        t0 = self.clock()
        try:
            logits = self.model.step(self.pool, batch)
        except Exception as e:  # a bug, not bad input (requests are checked on submit): fail those requests
            log.exception("model step failed")
            for handle in {seq.handle for seq, _ in work}:
                self._drop(handle, f"internal error: {type(e).__name__}: {e}")
            return True
        self.steps += 1
        self.observer.on_step(len(batch), decode_tokens, sum(c for _, c in work) - decode_tokens, self.clock() - t0)
        for (seq, chunk), row in zip(work, logits):
            if seq.handle.done or seq not in self._active:
                continue
            try:
                if seq.phase == DECODE:
                    self._sample(seq, row)
                else:
                    self._read(seq, chunk, row)
            except RwkvCpuError as e:      # e.g. every token banned by a logits processor
                self._drop(seq.handle, str(e))
        return True

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or self.pool.free - self._reserved < self._waiting[0].request.n:
                    return
                handle = self._waiting.popleft()
            self._start(handle)

    def _start(self, handle: Handle) -> None:
        request = handle.request
        prompt = np.asarray(request.prompt, np.int64)
        cached, state = 0, None
        if self.cache is not None:
            # Leave at least one token to read: its logits give the first sampled token.
            cached, state = self.cache.longest_prefix(prompt, limit=prompt.shape[0] - 1)
            self.observer.on_cache_lookup(state is not None, cached)
        handle.cached_tokens = cached
        handle.started = self.clock()
        seq = self._new_sequence(handle, 0, self.pool.acquire(state))
        handle._reserved = request.n - 1
        self._reserved += handle._reserved
        seq.feed, seq.pos = prompt, cached
        if self.cache is not None:
            seq.stops = sorted({int(b) for b in request.boundaries if cached < b <= prompt.shape[0]})
        self._active.append(seq)

    def _new_sequence(self, handle: Handle, index: int, slot: int) -> _Sequence:
        request = handle.request
        seed = request.params.seed
        if seed is None:
            rng = np.random.default_rng()
        else:
            # choice 0 draws exactly as model.generate(seed=seed) does; the others from their own streams
            rng = np.random.default_rng(seed if index == 0 else [seed, index])
        sampler = Sampler(request.params, self.vocab_size, rng)
        sampler.observe(request.prompt)
        following = None if request.constraint is None else request.constraint.start(self.tokenizer, self.vocab_size)
        output = Detokenizer(self.tokenizer, request.params, strip_leading_space=request.strip_leading_space,
                             constraint=following)
        return _Sequence(handle, index, slot, sampler, output)

    def _read(self, seq: _Sequence, chunk: int, row: np.ndarray) -> None:
        """A chunk of the sequence's prompt (or closing tokens) was read."""
        seq.pos += chunk
        end = seq.pos == seq.feed.shape[0]
        if seq.phase == CLOSE:
            if end:
                self.cache.put(seq.close_key, self.pool.state(seq.slot))
                self._finish(seq)
            return
        if self.cache is not None and seq.pos in seq.stops:
            self.cache.put(seq.feed[:seq.pos], self.pool.state(seq.slot))
        if not end:
            return
        # The prompt is read: fork the other choices from its state, then sample each one's first token.
        seq.phase = DECODE
        family = [seq]
        n = seq.handle.request.n
        if n > 1:
            prompt_state = self.pool.snapshot(seq.slot)
            for i in range(1, n):
                child = self._new_sequence(seq.handle, i, self.pool.acquire(prompt_state))
                child.phase = DECODE
                family.append(child)
                self._active.append(child)
            self._reserved -= seq.handle._reserved
            seq.handle._reserved = 0
        for s in family:
            self._sample(s, row)

    def _sample(self, seq: _Sequence, row: np.ndarray) -> None:
        request = seq.handle.request
        logits = row
        if request.logits_processors or seq.output.constraint is not None:
            logits = np.array(row, np.float32)
            for process in request.logits_processors:
                process(seq.output.tokens, logits)
            if seq.output.constraint is not None:
                seq.output.constraint.mask(logits)
        token = seq.sampler.sample(logits)
        logprob = top = None
        if request.logprobs is not None:
            lp = log_softmax(row)
            logprob = float(lp[token])
            k = request.logprobs
            if k:
                best = np.argpartition(-lp, k)[:k]
                best = best[np.argsort(-lp[best], kind="stable")]
                top = [(int(t), float(lp[t])) for t in best]
        text = seq.output.push(token)
        seq.generated += 1
        seq.handle.completion_tokens += 1
        now = self.clock()
        if seq.last_token_at is None:
            if seq.index == 0:
                self.observer.on_first_token(now - seq.handle.submitted)
        else:
            self.observer.on_token_gap(now - seq.last_token_at)
        seq.last_token_at = now
        kept = seq.output.finish_reason != "stop_token"
        if kept:
            seq.sampler.accept(token)
            seq.pending = token
        if kept or text or request.logprobs is not None:
            seq.handle._put(Token(seq.index, token if kept else None, text, logprob if kept else None,
                                  top if kept else None))
        if seq.output.finish_reason is not None:
            self._done(seq)

    def _done(self, seq: _Sequence) -> None:
        """The sequence stopped generating: finish it, or first bring its state to the end of the reply
        as the next turn's prompt will hold it, and cache that."""
        request = seq.handle.request
        out = seq.output
        if (request.close_turn is None or self.cache is None or request.n != 1
                or out.finish_reason == "length"):
            self._finish(seq)
            return
        prompt = np.asarray(request.prompt, np.int64)
        reply = np.asarray(request.close_turn(out.text), np.int64)
        key = np.concatenate([prompt, reply])
        if key in self.cache:
            self._finish(seq)
            return
        # The slot holds the prompt and the tokens read so far: all the kept ones after a stop
        # token, all but the last (sampled, not read) after a stop string.
        read = out.tokens if out.finish_reason == "stop_token" else out.tokens[:-1]
        if len(read) <= reply.shape[0] and np.array_equal(reply[:len(read)], read):
            # the model wrote the reply as the tokenizer would: read only what is missing
            pos = len(read)
        else:
            # otherwise read the reply's tokens again from the prompt's state
            n, state = self.cache.longest_prefix(prompt, count=False)
            if n != prompt.shape[0]:
                self._finish(seq)
                return
            self.pool.load(seq.slot, state)
            pos = 0
        if pos == reply.shape[0]:
            self.cache.put(key, self.pool.state(seq.slot))
            self._finish(seq)
            return
        seq.phase, seq.feed, seq.pos, seq.stops, seq.close_key = CLOSE, reply, pos, [], key

    def _finish(self, seq: _Sequence) -> None:
        out = seq.output
        reason = "length" if out.finish_reason == "length" else "stop"
        self._active.remove(seq)
        self.pool.release(seq.slot)
        seq.handle._put(Finished(seq.index, reason, seq.generated, out.stop_string))
        if seq.handle.done:
            handle = seq.handle
            self.observer.on_request_done(handle.prompt_tokens, handle.cached_tokens, handle.completion_tokens)
            self._request_seconds = 0.9 * self._request_seconds + 0.1 * (self.clock() - handle.started)

    def _drop(self, handle: Handle, message: str) -> None:
        """End a request now: free its slots (and those held for its forks), tell its reader."""
        for seq in [s for s in self._active if s.handle is handle]:
            self._active.remove(seq)
            self.pool.release(seq.slot)
        self._reserved -= handle._reserved
        handle._reserved = 0
        if not handle.done:
            handle._put(Failed(message))

    def _drop_cancelled(self) -> None:
        with self._cond:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
            for handle in cancelled:
                try:
                    self._waiting.remove(handle)
                except ValueError:
                    pass
        for handle in cancelled:
            self._drop(handle, "cancelled")
