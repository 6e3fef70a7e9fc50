"""Streaming generation, a non-streaming convenience, and chat sessions.

A generation owns its state and its random generator and only calls
``model.forward``, which never changes a state passed to it: one Model can
serve several threads at once, each with its own generation.

Example:
    >>> import rwkvcpu
    >>> model = rwkvcpu.load("model.safetensors")
    >>> for text in model.generate("Once upon a time", max_tokens=50, seed=1):
    ...     print(text, end="", flush=True)
    >>> model.complete("The capital of France is", temperature=0, max_tokens=5)
    ' Paris.'
    >>> chat = model.chat_session()
    >>> print(chat.ask("Hello! Who are you?"))
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .errors import InvalidArgumentError
from .sampling import Sampler, SamplingParams, make_params

# Prompts are fed in slices of this many tokens: long prompts need no
# (T, vocab) buffers, and Ctrl-C is noticed between slices.
PREFILL_CHUNK = 512

Prompt = Union[str, Sequence[int]]


def model_tokenizer(model):
    """The model's tokenizer (``model.tokenizer`` if it has one, else from its metadata)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        from .tokenizers import load_tokenizer
        tokenizer = load_tokenizer(model.metadata)
    return tokenizer


def prompt_tokens(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt given as text or as ids; InvalidArgumentError when empty or out of range."""
    if isinstance(prompt, str):
        tokens = tokenizer.encode(prompt)
    elif isinstance(prompt, (bytes, bytearray)):
        raise InvalidArgumentError("the prompt must be text (str) or a list of token ids, not bytes")
    else:
        tokens = tokenizer.check_ids(prompt, "prompt token id")
    if not tokens:
        raise InvalidArgumentError("the prompt is empty: give some text for the model to continue")
    return tokens


def prefill(model, tokens: Sequence[int], state=None):
    """Feed tokens in slices of PREFILL_CHUNK; return (logits of the last, new state)."""
    logits = None
    for start in range(0, len(tokens), PREFILL_CHUNK):
        logits, state = model.forward(list(tokens[start:start + PREFILL_CHUNK]), state)
    return logits, state


class StopMatcher:
    """Finds stop strings in streamed text, holding back what might begin one.

    Example:
        >>> m = StopMatcher(["\\n\\nUser:"])
        >>> m.push("Hi!\\n")
        ('Hi!', None)
        >>> m.push("\\nUser: x")
        ('', '\\n\\nUser:')
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> tuple[str, Optional[str]]:
        """Add text; return (text safe to emit, the stop string found or None)."""
        if not self.stops:
            return text, None
        buf = self.held + text
        found, at = None, len(buf)
        for s in self.stops:
            i = buf.find(s)
            if 0 <= i < at:
                found, at = s, i
        if found is not None:
            self.held = ""
            return buf[:at], found
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        """End of the stream: the held text did not become a stop string."""
        held, self.held = self.held, ""
        return held


@dataclasses.dataclass
class GenerationStats:
    """Counts and timings of one generation (seconds of our own work, not the caller's)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens in {self.prompt_seconds:.2f} s "
                f"({self.prompt_tokens_per_second:.1f} tokens/s); "
                f"generation: {self.generated_tokens} tokens in {self.generation_seconds:.2f} s "
                f"({self.generation_tokens_per_second:.1f} tokens/s)")


class Detokenizer:
    """What a generation makes of each sampled token: stop tokens, text safe to show, stop strings, max_tokens.

    One per sequence; `Generation` drives one, and so does the server's scheduler
    for every sequence of its batch. Text never splits a UTF-8 character and never
    contains (the start of) a stop string.

    Args:
        tokenizer: the model's tokenizer.
        params: SamplingParams (its stop, stop_tokens and max_tokens are used here).
        strip_leading_space: drop whitespace before the first visible character
            (a chat reply starts after "Assistant:").
        constraint: this sequence's rwkvcpu.structured.ConstraintState, or None:
            each token taken advances it, its end-of-text token is a stop token,
            and the sequence ends when it is complete. (The caller masks the
            logits with ``constraint.mask`` before sampling.)

    Attributes:
        tokens: the ids taken so far (stop tokens excluded).
        text: the text emitted so far.
        finish_reason: None while running, then "stop" (a stop string), "stop_token"
            (end-of-text or another stop token), "constraint" (the constraint is
            complete: nothing more can follow) or "length" (max_tokens reached).
        stop_string: the stop string that ended it, if any.
        constraint: the ConstraintState, or None.

    Example:
        >>> out = Detokenizer(model.tokenizer, SamplingParams(stop=["\\n"], max_tokens=20))
        >>> while out.finish_reason is None:
        ...     print(out.push(sampler.sample(logits)), end="")   # (feeding the model left out)
    """

    def __init__(self, tokenizer, params: SamplingParams, *, strip_leading_space: bool = False,
                 constraint=None):
        stops = params.stop_tokens
        if stops is None:
            eos = tokenizer.eos_token_id
            stops = () if eos is None else (eos,)
        self.constraint = constraint
        if constraint is not None:
            # the constraint allows end-of-text only where the output may end
            stops = tuple(stops) + (constraint.eos_token,)
        self.stop_tokens = frozenset(stops)
        self.max_tokens = params.max_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.stop_string: Optional[str] = None
        self._stream = tokenizer.stream()
        self._stopper = StopMatcher(params.stop)
        self._lstrip = strip_leading_space
        if self.max_tokens == 0:
            self.finish_reason = "length"

    def push(self, token: int) -> str:
        """Take one sampled token; return the text it makes safe to show (maybe "").

        Afterwards `finish_reason` says whether the sequence has ended; a stop
        token is not kept in `tokens` (the model need not be fed it).
        """
        if token in self.stop_tokens:
            self.finish_reason = "stop_token"
            return self._flush()
        self.tokens.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        piece = self._stream.push(token)
        if self._lstrip and not self.text and not self._stopper.held:
            # a reply starts at its first visible character: a leading
            # blank line is not yet the end of the turn
            piece = piece.lstrip()
        text, stop = self._stopper.push(piece)
        if stop is not None:
            self.finish_reason, self.stop_string = "stop", stop
            return self._emit(text)
        text = self._emit(text)
        if self.constraint is not None and self.constraint.done:
            self.finish_reason = "constraint"
            text += self._flush()
        elif self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            text += self._flush()
        return text

    def _flush(self) -> str:
        text, stop = self._stopper.push(self._stream.flush())
        if stop is not None:
            self.finish_reason, self.stop_string = "stop", stop
        else:
            text += self._stopper.flush()
        return self._emit(text)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


class Generation:
    """An iterator of text chunks, produced as the model generates.

    Nothing is computed until the first ``next()``; stopping early is just
    not asking for more (``break``). Chunks never split a UTF-8 character
    and never contain (the start of) a stop string.

    Attributes:
        tokens: ids generated so far (stop tokens excluded).
        text: text emitted so far.
        finish_reason: None while running, then "stop" (a stop string),
            "stop_token" (end-of-text or another stop token), "constraint"
            (the output is complete: the constraint lets nothing follow) or
            "length" (max_tokens reached).
        stop_string: the stop string that ended it, if any.
        stats: GenerationStats.
        state: (property) the state after the prompt and every token in
            ``tokens``, e.g. to continue later with ``generate(model, more, state=g.state)``.
    """

    def __init__(self, model, prompt: Prompt, params: SamplingParams, state=None, *,
                 rng: Optional[np.random.Generator] = None, strip_leading_space: bool = False,
                 constraint=None):
        self.model = model
        self.tokenizer = model_tokenizer(model)
        self.params = params
        self.prompt = prompt_tokens(self.tokenizer, prompt)
        self.sampler = Sampler(params, model.config.vocab_size, rng)
        # a structured.Constraint: this generation follows it in its own state
        following = None if constraint is None else constraint.start(self.tokenizer, model.config.vocab_size)
        self.output = Detokenizer(self.tokenizer, params, strip_leading_space=strip_leading_space,
                                  constraint=following)
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))
        self._state = state
        self._logits = None
        self._pending: Optional[int] = None   # generated, not yet fed to the model
        self._steps = self._run()

    tokens = property(lambda self: self.output.tokens)
    text = property(lambda self: self.output.text)
    finish_reason = property(lambda self: self.output.finish_reason)
    stop_string = property(lambda self: self.output.stop_string)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._steps)

    @property
    def state(self):
        """The state after the prompt and all generated tokens (feeds the last one if needed)."""
        if self._logits is None:
            # never started: run the prompt so the state covers it
            self._start()
        self._feed_pending()
        return self._state

    def _start(self):
        t0 = time.perf_counter()
        self._logits, self._state = prefill(self.model, self.prompt, self._state)
        self.stats.prompt_seconds = time.perf_counter() - t0
        self.sampler.observe(self.prompt)

    def _feed_pending(self):
        if self._pending is not None:
            # cleared only once fed: a Ctrl-C inside forward leaves it pending
            self._logits, self._state = self.model.forward([self._pending], self._state)
            self._pending = None

    def _run(self) -> Iterator[str]:
        out = self.output
        if self._logits is None:
            self._start()
        while out.finish_reason is None:
            t0 = time.perf_counter()
            self._feed_pending()
            if out.constraint is not None:
                # the logits are this generation's own (a new array per forward)
                out.constraint.mask(self._logits)
            token = self.sampler.sample(self._logits)
            self.stats.generation_seconds += time.perf_counter() - t0
            text = out.push(token)
            if out.finish_reason != "stop_token":
                self.sampler.accept(token)
                self.stats.generated_tokens += 1
                self._pending = token
            if text:
                yield text


# The keyword arguments that ask for structured output (rwkvcpu.structured.make_constraint).
CONSTRAINT_KEYS = ("json_schema", "json_object", "regex", "grammar", "choices", "constraint")


def pop_constraint(options: dict):
    """Take the constraint keywords out of `options`; the compiled Constraint, or None.

    ``constraint=`` passes one already compiled (structured.make_constraint),
    to reuse it across requests.
    """
    given = {k: options.pop(k) for k in CONSTRAINT_KEYS if k in options}
    compiled = given.pop("constraint", None)
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    if compiled is not None and given:
        raise InvalidArgumentError(f"give one constraint at most, got constraint and {' and '.join(given)}")
    if compiled is not None or not given:
        return compiled
    from .structured import make_constraint
    return make_constraint(**given)


def generate(model, prompt: Prompt, params: Optional[SamplingParams] = None, *, state=None,
             ignore_eos: bool = False, **options) -> Generation:
    """Generate a continuation of a prompt, as an iterator of text chunks.

    Args:
        model: a loaded Model (``rwkvcpu.load``).
        prompt: text, or a list of token ids; must not be empty.
        params: SamplingParams; keyword options override its fields.
        state: continue from this state (e.g. a previous Generation's
            ``state``) instead of a fresh one; it is not changed.
        ignore_eos: do not stop at the end-of-text token (the CLI's --ignore-eos);
            stop_tokens given explicitly still stop.
        **options: any SamplingParams field: temperature, top_p, top_k,
            min_p, presence_penalty, frequency_penalty, penalty_decay,
            repetition_penalty, logit_bias, banned_tokens, stop, stop_tokens,
            max_tokens, seed; and at most one constraint on the output
            (needs ``rwkvcpu[structured]``; see rwkvcpu.structured.make_constraint):
            json_schema (dict or JSON text), json_object=True (any JSON
            object), regex, grammar (Lark or GBNF text), choices (strings),
            or constraint (one compiled by make_constraint).

    Returns:
        a Generation: iterate it for text chunks; afterwards its tokens,
        finish_reason, stats and state describe what happened.

    Raises:
        InvalidArgumentError: empty prompt, unknown option, bad value or bad
            constraint (raised here, before anything is computed).
        ExtraNotInstalledError: a constraint without llguidance installed.

    Example:
        >>> for chunk in generate(model, "Once upon a time", max_tokens=100, seed=7):
        ...     print(chunk, end="", flush=True)
        >>> "".join(generate(model, "Pick a colour:", choices=["red", "green", "blue"]))
        'green'
    """
    constraint = pop_constraint(options)
    params = make_params(params, **options)
    if not isinstance(ignore_eos, bool):
        raise InvalidArgumentError(f"ignore_eos must be True or False, got {ignore_eos!r}")
    if ignore_eos and params.stop_tokens is None:
        # End-of-text is only the default of stop_tokens (None): no stop token instead.
        params = params.replace(stop_tokens=())
    return Generation(model, prompt, params, state, constraint=constraint)


def complete(model, prompt: Prompt, params: Optional[SamplingParams] = None, *, state=None,
             **options) -> str:
    """The whole continuation of a prompt as one string (see generate for the arguments).

    Example:
        >>> complete(model, "1, 2, 3,", temperature=0, max_tokens=8)
        ' 4, 5, 6, 7,'
        >>> json.loads(complete(model, "A person:", json_schema={"type": "object",
        ...     "properties": {"name": {"type": "string"}}, "required": ["name"]}))
        {'name': 'Alice'}
    """
    return "".join(generate(model, prompt, params, state=state, **options))


# ---------------------------------------------------------------------------
# Chat


# What ChatRWKV uses for chat with World models: a narrower top-p and
# stronger penalties than for free generation keep replies on topic.
CHAT_DEFAULTS = SamplingParams(top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5, max_tokens=500)
TURN_END = "\n\n"


def clean_message(message: str) -> str:
    """A user message as the World chat format needs it: trimmed, no blank lines.

    A blank line ("\\n\\n") ends a turn in the format, so runs of newlines
    inside a message become one.
    """
    message = message.replace("\r\n", "\n").replace("\r", "\n").strip()
    return re.sub(r"\n\s*\n+", "\n", message)


def chat_turn(speaker: str, message: str) -> str:
    """One turn of the World chat format: ``Speaker: message`` and the blank line that ends it.

    Example:
        >>> chat_turn("User", "Hi!\\n\\n\\nHow are you?")
        'User: Hi!\\nHow are you?\\n\\n'
    """
    return f"{speaker}: {clean_message(message)}{TURN_END}"


class ChatSession:
    """A conversation in the RWKV World chat format, held in the model's state.

    Each turn feeds only ``User: <message>\\n\\nAssistant:``; the reply is
    generated until a blank line. The history is never fed again: the
    state carries the conversation, so a turn costs the same at turn 1 or 1000.

    Args:
        model: a loaded Model.
        system: optional instructions fed once as ``System: ...\\n\\n``.
        user, assistant: the speakers' names in the format.
        state: start from this state (e.g. a state-tuned or saved one).
        params: SamplingParams (default CHAT_DEFAULTS); keyword options override.
        **sampling: SamplingParams fields. ``stop`` strings are added to the
            blank line that always ends a reply. A seed makes the whole
            conversation reproducible (each reply draws from one generator).

    Attributes:
        history: (message, reply) pairs, for display; never fed again.

    Example:
        >>> chat = ChatSession(model, seed=1)
        >>> for chunk in chat.send("Tell me a story about a cat."):
        ...     print(chunk, end="", flush=True)
        >>> chat.ask("What was the cat's name?")
        >>> chat.save("conversation.state")
    """

    def __init__(self, model, *, system: Optional[str] = None, user: str = "User",
                 assistant: str = "Assistant", state=None, params: Optional[SamplingParams] = None,
                 **sampling):
        self.model = model
        self.user, self.assistant = user, assistant
        self.system = system
        self.params = make_params(params or CHAT_DEFAULTS, **sampling)
        self.params.check_vocab(model.config.vocab_size)
        self._rng = np.random.default_rng(self.params.seed)
        self._initial = state
        self.history: list[tuple[str, str]] = []
        self._reply: Optional[Generation] = None
        self._message = ""
        self._state = self._fresh_state()

    def _fresh_state(self):
        if self.system and self.system.strip():
            text = chat_turn("System", self.system)
            _, state = prefill(self.model, prompt_tokens(model_tokenizer(self.model), text), self._initial)
            return state
        return self._initial

    def send(self, message: str, **sampling) -> Generation:
        """Send a message; return the reply as an iterator of text chunks.

        The reply may be read partly or not at all: the next call (or
        ``state``, ``save``) closes the turn properly either way. Besides
        sampling options, a constraint on this reply may be given (json_schema,
        json_object, regex, grammar, choices; see generate).

        Raises:
            InvalidArgumentError: the message is empty or holds text the
                model's tokenizer cannot read (e.g. bytes that are not UTF-8,
                for a Hugging Face tokenizer), or a bad option. The
                conversation is left as it was: send another message.
        """
        text = clean_message(message)
        if not text:
            raise InvalidArgumentError("the message is empty")
        constraint = pop_constraint(sampling)
        params = self.params
        if sampling:
            params = make_params(params, **sampling)
        params = params.replace(stop=(TURN_END,) + tuple(s for s in params.stop if s != TURN_END))
        # Tokenized before the last turn is closed: a refused message changes nothing.
        tokenizer = model_tokenizer(self.model)
        try:
            prompt = tokenizer.encode(f"{chat_turn(self.user, text)}{self.assistant}:")
        except InvalidArgumentError:
            # Say where in the message the problem is, not where in the turn around it.
            tokenizer.encode(text)
            raise
        self._close_turn()
        self._message = text
        self._reply = Generation(self.model, prompt, params, self._state, rng=self._rng,
                                 strip_leading_space=True, constraint=constraint)
        return self._reply

    def ask(self, message: str, **sampling) -> str:
        """Send a message and return the whole reply."""
        reply = self.send(message, **sampling)
        text = "".join(reply)
        self._close_turn()
        return text.strip()

    def _close_turn(self):
        """Fold the last reply into the state, ending it with a blank line if it did not."""
        reply = self._reply
        if reply is None:
            return
        state = reply.state
        if reply.stop_string != TURN_END:
            _, state = prefill(self.model, reply.tokenizer.encode(TURN_END), state)
        # Let go of the reply only now: after a Ctrl-C in the model calls above,
        # the next call closes the same turn again instead of losing it.
        self._state, self._reply = state, None
        self.history.append((self._message, reply.text.strip()))

    @property
    def state(self):
        """The state holding the whole conversation so far (None before anything was fed)."""
        self._close_turn()
        return self._state

    def reset(self) -> None:
        """Forget the conversation: back to the initial state (and system prompt)."""
        self._reply = None
        self.history = []
        self._state = self._fresh_state()

    def save(self, path) -> None:
        """Save the conversation's state to a file (see State.save)."""
        state = self.state
        if state is None:
            state = self.model.initial_state()
        state.save(path)

    def load(self, path) -> None:
        """Continue a conversation saved with save(); the history list starts empty.

        Raises:
            StateMismatchError: the file is not a state of this model.
        """
        from .state import State
        state = State.load(path, self.model)
        self._reply = None
        self.history = []
        self._state = state
