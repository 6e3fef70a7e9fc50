"""`rwkvcpu serve --ray` end to end: the official openai client against two replicas on a local Ray.

Run by tests/test_ray.py in a process of its own (inside a network namespace whose only interface
is loopback, where the machine allows one); run it alone with `python -m pytest tests/ray_serve_cases.py`.

One `rwkvcpu serve --ray --replicas 2` process serves the shipped model for the whole module: two
replicas of one thread and a batch of 4 each, behind the prefix-affinity front (replies up to 20,000
tokens, so that a request left running would hold its slot for minutes). Ray's start takes
most of the module's time (about 20 s on 2 cores), so everything is checked against that one
deployment, in order: answers equal the library's, conversations keep to the replica holding
their state, clients that hang up free their slots, a replica killed under load fails or retries
its requests cleanly, and Ctrl-C leaves no process behind. Every request is bounded by the client's timeout and every wait by a deadline.
"""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra (pip install -e '.[test]')")
pytest.importorskip("ray.serve", reason="needs the ray extra (pip install -e '.[ray]')")

import rwkvcpu  # noqa: E402
from rwkvcpu.models import default_model_path  # noqa: E402
from rwkvcpu.sampling import SamplingParams  # noqa: E402

TIMEOUT = 60
NAME = "rwkv-test"
REPLICA_TITLE = "ray::ServeReplica:rwkvcpu:Replica"
GREEDY = dict(temperature=0.0)
NO_EOS = {"0": -100}


def processes():
    """{pid: (parent pid, command line)} of every process on the machine."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            out[int(entry)] = (int(fields[1]), cmdline.strip())
    return out


def descendants(root):
    """{pid: command line} of the processes under `root`."""
    table = processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmdline) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdline
                frontier.append(pid)
    return found


@pytest.fixture(scope="module")
def model():
    return rwkvcpu.load(default_model_path())


@pytest.fixture(scope="module")
def serving():
    """The `rwkvcpu serve --ray` process and its URL; stopped by test_ctrl_c_leaves_no_process (or here)."""
    cmd = [sys.executable, "-m", "rwkvcpu.cli.main", "serve", "--ray", "--replicas", "2", "--threads", "1",
           "--max-batch", "4", "--max-tokens", "20000", "--port", "0", "--model-name", NAME]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    url = None
    lines = []
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving at (http://127\.0\.0\.1:\d+)/v1", line)
        url = m.group(1) if m else None
    if url is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("rwkvcpu serve --ray did not start:\n" + "".join(lines[-30:]))
    # its log goes on (Ray's warnings): drain it so that it never blocks on a full pipe
    concurrent.futures.ThreadPoolExecutor(1).submit(proc.stderr.read)
    yield proc, url
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.fixture(scope="module")
def client(serving):
    return openai.OpenAI(base_url=serving[1] + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def replicas(proc):
    return [pid for pid, cmdline in descendants(proc.pid).items() if cmdline.startswith(REPLICA_TITLE)]


def test_two_replicas_answer_as_the_library(serving, client, model):
    assert len(replicas(serving[0])) == 2
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "The old lighthouse"
    want = model.complete(prompt, params=SamplingParams(max_tokens=20, top_p=1.0, presence_penalty=0.0,
                                                        frequency_penalty=0.0, **GREEDY))
    # 8 at once: both replicas answer (a batch of 4 each), all as the library alone
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.completions.create(model=NAME, prompt=prompt, max_tokens=20,
                                                                     **GREEDY), range(8)))
    assert all(a.choices[0].text == want and a.usage.completion_tokens == 20 for a in answers)
    # a streamed chat reply, with usage at the end, is the reply the same request gets whole
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello there!"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, **GREEDY)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_conversation_stays_with_its_cached_state(client):
    """Every later turn of every conversation resumes from the state its previous turn left on its
    replica: at least that turn's prompt is cached. With two replicas and routing by load alone,
    each later turn would find its state with probability about 1/2."""

    def conversation(i):
        messages = [{"role": "system", "content": f"You are assistant number {i}."},
                    {"role": "user", "content": f"Tell me a story about the number {i}."}]
        seen = []
        for turn in range(4):
            r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, seed=i, temperature=1.0)
            seen.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": f"And then, {turn}?"}]
        return seen

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for seen in pool.map(conversation, range(2)):
            for (before, _), (_, cached) in zip(seen, seen[1:]):
                assert cached >= before, seen


def test_clients_that_go_away_give_their_slots_back(client):
    """8 streams of 20,000 tokens fill both replicas' batches; their clients read a little and hang up.
    Their requests must end at once (the proxy cancels the front's request, the front its call to the
    replica, the replica the scheduler's request): otherwise the next requests would wait in Ray's
    queue for minutes, past the client's timeout."""

    def hang_up(i):
        stream = client.completions.create(model=NAME, prompt=f"{i} long", max_tokens=20000, stream=True,
                                           logit_bias=NO_EOS)
        chunks = [c for _, c in zip(range(3), stream)]
        stream.close()
        return len(chunks)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(hang_up, range(8))) == [3] * 8
    quick = openai.OpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0, timeout=20)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda i: quick.completions.create(model=NAME, prompt=f"{i} short", max_tokens=8),
                              range(8)))
    assert all(a.usage.completion_tokens == 8 for a in after)


def test_a_replica_killed_under_load(serving, client):
    """SIGKILL one replica while both hold a full batch: requests not yet answered are retried on the
    other, streams already answering end with a clean error event, nothing hangs, and new requests
    succeed."""
    proc, _ = serving
    victim = replicas(proc)[0]

    def stream(i):
        try:
            chunks = list(client.completions.create(model=NAME, prompt=f"{i}: a story", max_tokens=600, stream=True,
                                                    stream_options={"include_usage": True}, logit_bias=NO_EOS))
            return "ok", chunks[-1].usage.completion_tokens
        except openai.APIError as e:
            return "error", str(e)

    def whole(i):
        r = client.completions.create(model=NAME, prompt=f"{i}: a tale", max_tokens=600, logit_bias=NO_EOS)
        return "ok", r.usage.completion_tokens

    # Prompts sharing no prefix: the router spreads them by load, in turn, so that each replica
    # holds both kinds in this order when the turns alternate.
    kinds = (whole, stream, stream, whole) * 2
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # 8 requests of 600 tokens fill both batches of 4 for several seconds; the kill comes 2 s in
        futures = [pool.submit(kind, i) for i, kind in enumerate(kinds)]
        time.sleep(2.0)
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=2 * TIMEOUT) for f in futures]
    assert time.monotonic() - t0 < 2 * TIMEOUT
    # The victim's requests: whole ones retried on the other replica (nothing was sent yet), streams
    # ended by an error event the client raises as APIError (tests/test_ray.py drives the front's
    # retry and error paths one by one, with a fake replica).
    wholes = [r for r, k in zip(results, kinds) if k is whole]
    streams = [r for r, k in zip(results, kinds) if k is stream]
    assert all(r == ("ok", 600) for r in wholes), wholes
    assert all(r == ("ok", 600) or (r[0] == "error" and "the replica serving this request stopped" in r[1])
               for r in streams), streams
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda i: client.completions.create(model=NAME, prompt=f"After {i}", max_tokens=8),
                              range(4)))
    assert all(a.usage.completion_tokens == 8 for a in after)


def test_ctrl_c_leaves_no_process(serving):
    proc, _ = serving
    ours = descendants(proc.pid)
    assert any("raylet" in c for c in ours.values()) and any(c.startswith(REPLICA_TITLE) for c in ours.values())
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {pid: c for pid, c in processes().items() if pid in ours and c == ours[pid]}
        if not left:
            break
        time.sleep(0.5)
    assert not left, left
