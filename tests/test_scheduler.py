"""The scheduler alone (rwkvcpu/scheduler.py): batching, the prefill budget, fairness, cancellation,
the queue bound, n > 1 forks, logits processors, and the state cache (rwkvcpu/cache.py).

A fake model (generate_fakes.FakeModel with Model.step's contract) logs every step's batch,
so the tests see exactly what the scheduler asked of the engine; a fake clock makes the
measured times exact. run_once is called by hand except where the thread is the subject.
"""

import asyncio
import threading

import numpy as np
import pytest

from generate_fakes import FakeModel
from rwkvcpu.batch import StatePool
from rwkvcpu.cache import StateCache
from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.generate import generate
from rwkvcpu.sampling import SamplingParams
from rwkvcpu.scheduler import (Failed, Finished, Observer, QueueFullError, Request, Scheduler, Token,
                               share_budget)


class BatchFake(FakeModel):
    """FakeModel with the batched engine's contract: state_pool and step (each entry alone)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.batches = []          # per step: [(slot, tokens), ...]

    def state_pool(self, capacity):
        return StatePool(self, capacity)

    def _check_state(self, state):
        return state.copy()

    def step(self, pool, batch):
        self.batches.append([(slot, list(map(int, tokens))) for slot, tokens in batch])
        rows = []
        for slot, tokens in batch:
            logits, new = self.forward(list(map(int, tokens)), pool.state(slot))
            pool.data[slot] = new.data
            rows.append(logits)
        return np.stack(rows)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.5
        return self.now


GREEDY = SamplingParams(temperature=0, max_tokens=12, presence_penalty=0, frequency_penalty=0)


def drain(scheduler, handles, limit=1000):
    """Run steps until every handle is done (bounded)."""
    for _ in range(limit):
        if all(h.done for h in handles):
            return
        scheduler.run_once()
    raise AssertionError("requests did not finish")


def events(handle):
    out = []
    while not handle._events.empty():
        out.append(handle._events.get())
    return out


def text_of(evs, index=0):
    return "".join(e.text for e in evs if isinstance(e, Token) and e.index == index)


def encode(model, text):
    return model.tokenizer.encode(text)


def test_batched_requests_give_what_generate_gives_alone():
    model = BatchFake("Once upon a time, there was a cat.\n\n")
    scheduler = Scheduler(model, max_batch=4, prefill_budget=16)
    prompts = ["Once", "Once upon a", "x", "upon", "Once upon a time, there"]
    params = [GREEDY, GREEDY.replace(temperature=0.9, top_p=0.9, seed=3), GREEDY.replace(max_tokens=3),
              GREEDY.replace(stop=["cat"]), GREEDY.replace(temperature=1.5, seed=11, max_tokens=30)]
    handles = [scheduler.submit(Request(encode(model, p), q)) for p, q in zip(prompts, params)]
    drain(scheduler, handles)
    assert max(len(b) for b in model.batches) == 4          # max_batch sequences at once
    for p, q, h in zip(prompts, params, handles):
        evs = events(h)
        alone = generate(model, p, q)
        want = "".join(alone)
        assert text_of(evs) == want
        fin = [e for e in evs if isinstance(e, Finished)]
        assert len(fin) == 1 and h.done
        assert fin[0].finish_reason == {"stop_token": "stop"}.get(alone.finish_reason, alone.finish_reason)
    assert scheduler.pool.free == 4 and scheduler.active == 0


def test_prefill_budget_never_stalls_decoding_streams():
    model = BatchFake("abcdefghij" * 3)
    scheduler = Scheduler(model, max_batch=4, prefill_budget=8)
    decoding = scheduler.submit(Request(encode(model, "abc"), GREEDY.replace(max_tokens=40)))
    scheduler.run_once()
    scheduler.run_once()
    (slot,) = [s.slot for s in scheduler._active]
    long = scheduler.submit(Request(list(range(97, 97 + 10)) * 10, GREEDY.replace(max_tokens=2)))
    before = len(model.batches)
    drain(scheduler, [long])
    steps = model.batches[before:]
    assert len(steps) >= 100 // 8
    for batch in steps:
        mine = [toks for s, toks in batch if s == slot]
        others = [toks for s, toks in batch if s != slot]
        # the stream already decoding advances by one token in every step ...
        assert len(mine) == 1 and len(mine[0]) == 1
        # ... and the prompt is read at most 8 tokens per step
        assert sum(map(len, others)) <= 8
    assert not decoding.done


def test_budget_is_shared_evenly_between_prompts():
    assert share_budget(64, [1000, 5, 1000]) == [30, 5, 29]
    assert share_budget(8, [1, 1, 1]) == [1, 1, 1]
    assert share_budget(2, [10, 10, 10]) == [1, 1, 0]
    assert share_budget(100, []) == []
    model = BatchFake("abc")
    scheduler = Scheduler(model, max_batch=4, prefill_budget=16)
    long = scheduler.submit(Request([97] * 400, GREEDY.replace(max_tokens=1)))
    scheduler.run_once()
    short = scheduler.submit(Request([98] * 10, GREEDY.replace(max_tokens=1)))
    steps = 0
    while not short.done:
        scheduler.run_once()
        steps += 1
    # the short prompt arriving after the long one is read in two steps of half the budget,
    # not after the 400-token prompt
    assert steps == 2 and not long.done


def test_cancel_frees_the_slot_before_the_next_step():
    model = BatchFake("abcdefgh")
    scheduler = Scheduler(model, max_batch=2)
    a = scheduler.submit(Request(encode(model, "ab"), GREEDY.replace(max_tokens=100)))
    b = scheduler.submit(Request(encode(model, "abc"), GREEDY.replace(max_tokens=100)))
    scheduler.run_once()
    scheduler.run_once()
    assert scheduler.pool.free == 0
    slot_a = next(s.slot for s in scheduler._active if s.handle is a)
    a.cancel()
    scheduler.run_once()
    assert slot_a not in [slot for slot, _ in model.batches[-1]]
    assert scheduler.pool.free == 1 and scheduler.active == 1
    assert isinstance(events(a)[-1], Failed) and a.done
    # a queued request cancelled before it got a slot leaves the queue
    c = scheduler.submit(Request(encode(model, "a"), GREEDY))
    d = scheduler.submit(Request(encode(model, "a"), GREEDY))   # waits: one slot left after c
    d.cancel()
    scheduler.run_once()
    assert scheduler.waiting == 0 and d.done and not c.done
    b.cancel()
    c.cancel()
    scheduler.run_once()
    assert scheduler.pool.free == 2 and scheduler.active == 0


def test_a_full_queue_refuses_with_a_retry_time():
    model = BatchFake("ab")
    scheduler = Scheduler(model, max_batch=1, max_queue=2)
    # one request for the free slot, two waiting: the fourth is refused
    for _ in range(3):
        scheduler.submit(Request([97], GREEDY))
    with pytest.raises(QueueFullError) as e:
        scheduler.submit(Request([97], GREEDY))
    assert e.value.retry_after >= 1
    scheduler.run_once()            # one admitted: still two waiting for the taken slot
    with pytest.raises(QueueFullError):
        scheduler.submit(Request([97], GREEDY))
    drain(scheduler, list(scheduler._waiting))
    scheduler.submit(Request([97], GREEDY))
    # no queue at all: requests are taken while a slot is free, refused once none is
    scheduler = Scheduler(model, max_batch=1, max_queue=0)
    scheduler.submit(Request([97], GREEDY.replace(max_tokens=50)))
    scheduler.run_once()
    with pytest.raises(QueueFullError):
        scheduler.submit(Request([97], GREEDY))


def test_bad_requests_are_refused_on_submit():
    model = BatchFake("ab")
    scheduler = Scheduler(model, max_batch=2)
    for req, msg in [(Request([]), "empty"), (Request([300]), r"\[0, 255\]"), (Request([1], n=3), "n must"),
                     (Request([1], logprobs=21), "logprobs"),
                     (Request([1], SamplingParams(logit_bias={999: 1.0})), "vocabulary")]:
        with pytest.raises(InvalidArgumentError, match=msg):
            scheduler.submit(req)
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        Scheduler(model, max_batch=0)


def test_n_choices_read_the_prompt_once_and_fork():
    model = BatchFake("Once upon a time.\n\n")
    scheduler = Scheduler(model, max_batch=4)
    prompt = encode(model, "Once upon")
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=5, max_tokens=8)
    h = scheduler.submit(Request(prompt, params, n=3))
    other = scheduler.submit(Request(prompt, GREEDY))          # fits beside: 3 + 1 slots
    drain(scheduler, [h, other])
    evs = events(h)
    texts = [text_of(evs, i) for i in range(3)]
    assert len(set(texts)) > 1                                  # each choice its own draws
    assert texts[0] == "".join(generate(model, prompt, params))  # choice 0 = generate(seed=5)
    reads = [toks for batch in model.batches for _, toks in batch if len(toks) > 1]
    assert reads.count(prompt) == 2                             # once for h, once for `other`
    assert h.completion_tokens == 24 and scheduler.pool.free == 4 and scheduler._reserved == 0


def test_logprobs_and_logits_processors():
    model = BatchFake("abcabc")
    scheduler = Scheduler(model, max_batch=1)

    def no_c(tokens, logits):
        logits[ord("c")] = -np.inf

    h = scheduler.submit(Request(encode(model, "ab"), GREEDY.replace(max_tokens=3), logprobs=2,
                                 logits_processors=[no_c]))
    drain(scheduler, [h])
    toks = [e for e in events(h) if isinstance(e, Token)]
    assert "c" not in "".join(t.text for t in toks)
    first = toks[0]
    # logprobs are the model's: "c" is still its most likely token
    assert first.top_logprobs[0][0] == ord("c") and first.logprob < first.top_logprobs[0][1]
    assert first.logprob == pytest.approx(np.log(np.exp(first.logprob)))


def test_measurements_with_a_fake_clock():
    seen = {}

    class Spy(Observer):
        def on_first_token(self, s):
            seen.setdefault("ttft", []).append(s)

        def on_token_gap(self, s):
            seen.setdefault("gap", []).append(s)

        def on_step(self, sequences, decode, prefill, s):
            seen.setdefault("steps", []).append((sequences, decode, prefill))

        def on_request_done(self, p, c, g):
            seen["done"] = (p, c, g)

    model = BatchFake("abcdef")
    clock = Clock()
    scheduler = Scheduler(model, max_batch=2, prefill_budget=2, observer=Spy(), clock=clock)
    h = scheduler.submit(Request(encode(model, "abcd"), GREEDY.replace(max_tokens=3)))
    drain(scheduler, [h])
    # every clock reading adds 0.5 s: the measured intervals are exact multiples of it
    assert seen["ttft"][0] % 0.5 == 0 and seen["ttft"][0] > 0
    assert seen["gap"] and all(g % 0.5 == 0 and g > 0 for g in seen["gap"])
    assert seen["steps"][:2] == [(1, 0, 2), (1, 0, 2)] and seen["steps"][2] == (1, 1, 0)
    assert seen["done"] == (4, 0, 3)


def test_cache_resumes_from_the_longest_prefix_and_the_next_turn_reads_only_itself():
    model = BatchFake("Once upon a time.\n\n")
    cache = StateCache(model, max_bytes=1 << 20)
    scheduler = Scheduler(model, max_batch=2, cache=cache)
    system = encode(model, "System: be brief\n\n")
    user = encode(model, "User: hi\n\n")
    turn = system + user + encode(model, "Assistant:")
    params = GREEDY.replace(stop=["\n\n"], max_tokens=40)

    def close(text):
        return encode(model, f" {text}\n\n")

    h = scheduler.submit(Request(turn, params, boundaries=[len(system), len(system + user), len(turn)],
                                 close_turn=close, strip_leading_space=True))
    drain(scheduler, [h])
    reply = text_of(events(h))
    assert h.cached_tokens == 0 and system in cache and turn in cache
    nxt = turn + close(reply) + encode(model, "User: more\n\nAssistant:")
    assert turn + close(reply) in cache
    fed_before = len(model.fed)
    h2 = scheduler.submit(Request(nxt, params))
    drain(scheduler, [h2])
    assert h2.cached_tokens == len(turn + close(reply))
    # what the model read for it: the new turn, then its own reply
    new = len(nxt) - h2.cached_tokens
    assert model.fed[fed_before:fed_before + new] == nxt[h2.cached_tokens:] == encode(model, "User: more\n\nAssistant:")
    # the same answer as from scratch
    assert text_of(events(h2)) == "".join(generate(model, nxt, params))
    assert cache.hits == 1


def test_cache_is_bounded_in_bytes_and_persists(tmp_path):
    model = BatchFake("abc")
    state = model.initial_state()
    per = state.data.nbytes
    cache = StateCache(model, max_bytes=3 * per + 3 * 4 * 10, directory=tmp_path)
    for i in range(5):
        st = state.copy()
        st.data[0] = i
        cache.put([i] * 10, st)
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert [0] * 10 not in cache and [4] * 10 in cache
    n, got = cache.longest_prefix([3] * 10 + [7, 7])
    assert n == 10 and got.data[0] == 3
    assert cache.longest_prefix([9, 9])[0] == 0 and (cache.hits, cache.misses) == (1, 1)
    cache.flush()
    assert len(list(tmp_path.glob("*.state"))) == 3
    cache.close()
    again = StateCache(model, max_bytes=1 << 20, directory=tmp_path)
    assert len(again) == 3 and again.longest_prefix([4] * 10 + [1])[1].data[0] == 4
    # another model's files are skipped, not loaded
    other = BatchFake("xyz")
    assert len(StateCache(other, max_bytes=1 << 20, directory=tmp_path)) == 0


def test_thread_and_asyncio_delivery():
    model = BatchFake("Once upon a time.\n\n")
    scheduler = Scheduler(model, max_batch=4).start()
    try:
        h = scheduler.submit(Request(encode(model, "Once"), GREEDY))
        assert "".join(e.text for e in h if isinstance(e, Token)) == "".join(generate(model, "Once", GREEDY))

        async def main():
            loop = asyncio.get_running_loop()
            hs = [scheduler.submit(Request(encode(model, p), GREEDY), loop=loop) for p in ("Once", "upon")]

            async def read(h):
                return "".join([e.text async for e in h if isinstance(e, Token)])
            return await asyncio.gather(*map(read, hs))

        assert asyncio.run(main()) == ["".join(generate(model, p, GREEDY)) for p in ("Once", "upon")]
        # a long request cancelled from another thread ends with Failed
        long = scheduler.submit(Request(encode(model, "Once"), GREEDY.replace(max_tokens=None, stop_tokens=[])))
        threading.Timer(0.05, long.cancel).start()
        assert isinstance(list(long)[-1], Failed)
    finally:
        scheduler.stop()
    assert scheduler.pool.free == 4
