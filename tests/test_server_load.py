"""Load on a live `rwkvcpu serve` process: 32 concurrent clients, a few hundred requests of random
lengths on a tiny model, some cancelled mid-stream, some bad on purpose.

Nothing may fail but the deliberate ones, nothing may hang (every request and the whole run are
bounded in time), and afterwards the server holds no sequence, no queue, and its memory is back
near the level it had after a warm-up round of the same mix.
"""

import asyncio
import random
import re
import time

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the test extra (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs its extra (pip install -e '.[server]')")

from generate_fakes import tiny_v7_file  # noqa: E402,F401 (fixture)
from test_server import metric, serve_process  # noqa: E402

CLIENTS = 32
WARMUP, REQUESTS = 64, 300
REQUEST_TIMEOUT = 60
RUN_TIMEOUT = 400
# Allowed growth of the server's resident memory between the warm-up and the end of the load.
MEMORY_SLACK = 40 << 20


def rss(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.fixture(scope="module")
def served(tiny_v7_file):
    with serve_process(str(tiny_v7_file), "--threads", "1", "--max-batch", "16", "--max-queue", "512",
                       "--cache-size", "2M", "--max-tokens", "64") as running:
        yield running


def jobs(n, seed):
    """(kind, arguments) for n requests: mostly good ones of random lengths, some cancelled, some bad."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(rng.randint(1, 300)))
        max_tokens = rng.randint(1, 48)
        roll = rng.random()
        if roll < 0.12:
            out.append(("cancel", dict(prompt=prompt, max_tokens=64, after=rng.randint(0, 5))))
        elif roll < 0.22:
            out.append(("bad", rng.choice([dict(temperature=3.0), dict(model="nope"), dict(max_tokens=10**6),
                                           dict(top_p=0.0)]) | dict(prompt=prompt)))
        elif roll < 0.6:
            out.append(("chat", dict(prompt=prompt, max_tokens=max_tokens, stream=rng.random() < 0.5,
                                     n=rng.choice([1, 1, 2]), seed=rng.randint(0, 9))))
        else:
            out.append(("text", dict(prompt=prompt, max_tokens=max_tokens, stream=rng.random() < 0.5,
                                     temperature=rng.choice([0.0, 1.0]))))
    return out


async def run(url, work):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=REQUEST_TIMEOUT)
    queue = list(work)
    counts = {"ok": 0, "cancelled": 0, "refused": 0}

    async def one(kind, a):
        if kind == "bad":
            args = dict(model="tiny-v7", max_tokens=4) | a
            try:
                await client.completions.create(**args)
            except (openai.BadRequestError, openai.NotFoundError):
                counts["refused"] += 1
                return
            raise AssertionError(f"a bad request was answered: {args}")
        if kind == "cancel":
            stream = await client.completions.create(model="tiny-v7", prompt=a["prompt"], max_tokens=a["max_tokens"],
                                                     stream=True, stop=None)
            i = 0
            async for _ in stream:
                i += 1
                if i > a["after"]:
                    break
            await stream.close()
            counts["cancelled"] += 1
            return
        if kind == "chat":
            kw = dict(model="tiny-v7", messages=[{"role": "user", "content": a["prompt"]}],
                      max_tokens=a["max_tokens"], n=a["n"], seed=a["seed"])
            if a["stream"]:
                finish = {}
                async for chunk in await client.chat.completions.create(stream=True, **kw):
                    for c in chunk.choices:
                        if c.finish_reason:
                            finish[c.index] = c.finish_reason
                assert sorted(finish) == list(range(a["n"])) and set(finish.values()) <= {"stop", "length"}
            else:
                r = await client.chat.completions.create(**kw)
                assert len(r.choices) == a["n"] and r.usage.completion_tokens <= a["n"] * a["max_tokens"]
                assert all(c.finish_reason in ("stop", "length") for c in r.choices)
        else:
            kw = dict(model="tiny-v7", prompt=a["prompt"], max_tokens=a["max_tokens"], temperature=a["temperature"])
            if a["stream"]:
                reasons = [c.choices[0].finish_reason async for c in await client.completions.create(stream=True, **kw)
                           if c.choices]
                assert reasons[-1] in ("stop", "length")
            else:
                r = await client.completions.create(**kw)
                assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= a["max_tokens"]
        counts["ok"] += 1

    async def worker():
        while queue:
            await one(*queue.pop())

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CLIENTS))), RUN_TIMEOUT)
    await client.close()
    return counts


def settle(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "rwkvcpu_active_sequences") == 0 and metric(url, "rwkvcpu_queue_depth") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the server still holds sequences after the load")


def test_thirty_two_clients_hundreds_of_requests(served):
    proc, url = served
    warm = asyncio.run(run(url, jobs(WARMUP, seed=1)))
    settle(url)
    baseline = rss(proc.pid)
    work = jobs(REQUESTS, seed=2)
    counts = asyncio.run(run(url, work))
    settle(url)
    assert counts["ok"] + counts["cancelled"] + counts["refused"] == REQUESTS
    assert counts["refused"] == sum(k == "bad" for k, _ in work) and counts["cancelled"] > 10
    assert warm["ok"] > 0
    grown = rss(proc.pid) - baseline
    print(f"load: {counts}, server RSS {baseline / 1e6:.0f} MB after the warm-up, {grown / 1e6:+.1f} MB after")
    assert grown < MEMORY_SLACK, f"the server's memory grew by {grown / 1e6:.0f} MB under load"
    assert metric(url, "rwkvcpu_cache_bytes") <= 2 << 20
    assert proc.poll() is None
