"""The HTTP layer (rwkvcpu/server) through the official `openai` client against a live server on 127.0.0.1.

One in-process server (rwkvcpu.server.start, the call a desktop app makes) serves the
shipped model in int8 for the whole module; a few more, started beside it, carry the
settings a test is about (an API key, a queue of 0, a small body limit, CORS). Outputs
are compared with the library's own generate/complete on the same model, so the server
is held to what the engine gives alone. Every request is bounded by the client's timeout.
"""

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the test extra (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs its extra (pip install -e '.[server]')")

import rwkvcpu  # noqa: E402
import rwkvcpu.server  # noqa: E402
from rwkvcpu.generate import Generation, chat_turn  # noqa: E402
from rwkvcpu.models import default_model_path  # noqa: E402
from rwkvcpu.sampling import SamplingParams  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def model():
    return rwkvcpu.load(default_model_path(), dtype="int8")


@pytest.fixture(scope="module")
def server(model):
    s = rwkvcpu.server.start(model, port=0, max_batch=16, model_name="rwkv-test")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def raw(url, method="GET", body=None, headers=None):
    """(status, headers, body bytes) of one plain HTTP request."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    try:
        conn.request(method, u.path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def metric(url, name):
    _, _, text = raw(url + "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# What the server uses when a request leaves a field out (OpenAI's defaults), for the library's side.
def params(**kw):
    base = dict(temperature=1.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    base.update(kw)
    return SamplingParams(**base)


GREEDY = dict(temperature=0.0)


def test_models_health_metrics_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["rwkv-test"]
    assert client.models.retrieve("rwkv-test").id == "rwkv-test"
    status, _, body = raw(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = raw(server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("rwkvcpu_requests_total", "rwkvcpu_queue_depth", "rwkvcpu_batch_size_bucket",
                 "rwkvcpu_cache_bytes", "rwkvcpu_time_to_first_token_seconds_bucket",
                 "rwkvcpu_inter_token_latency_seconds_bucket", "rwkvcpu_cache_hits_total",
                 "rwkvcpu_generated_tokens_total", "rwkvcpu_prompt_tokens_total"):
        assert name in body.decode()
    status, headers, body = raw(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/v1/chat/completions" in body


def test_completion_is_what_the_library_gives(model, client):
    prompt = "The old lighthouse"
    r = client.completions.create(model="rwkv-test", prompt=prompt, max_tokens=24, **GREEDY)
    want = model.complete(prompt, params=params(max_tokens=24, **GREEDY))
    c = r.choices[0]
    assert c.text == want and c.finish_reason == "length" and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt)) and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    # token ids as the prompt, and echo
    ids = model.tokenizer.encode(prompt)
    r2 = client.completions.create(model="rwkv-test", prompt=ids, max_tokens=24, echo=True, **GREEDY)
    assert r2.choices[0].text == prompt + want


def test_stop_strings(model, client):
    prompt = "Once upon a time"
    full = model.complete(prompt, params=params(max_tokens=40, **GREEDY))
    stop = full[10:14]
    r = client.completions.create(model="rwkv-test", prompt=prompt, max_tokens=40, stop=[stop, "zzz"], **GREEDY)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="rwkv-test", prompt=prompt, max_tokens=40, stop=stop, stream=True, **GREEDY)
    chunks = list(r)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_with_a_system_message(model, client):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello there!"}]
    r = client.chat.completions.create(model="rwkv-test", messages=messages, max_tokens=30, seed=3, temperature=0.8)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    # the World chat format, as rwkvcpu chat feeds it
    tok = model.tokenizer
    prompt = (tok.encode(chat_turn("System", "You answer briefly.")) + tok.encode(chat_turn("User", "Hello there!"))
              + tok.encode("Assistant:"))
    assert r.usage.prompt_tokens == len(prompt)
    # a reply starts at its first visible character, as in rwkvcpu chat
    want = "".join(Generation(model, prompt, params(max_tokens=30, seed=3, temperature=0.8, stop=["\n\n"]),
                              strip_leading_space=True))
    assert c.message.content == want
    assert c.finish_reason in ("stop", "length") and "\n\n" not in c.message.content


def test_streaming_chunks_as_openai_clients_read_them(client):
    kw = dict(model="rwkv-test", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20,
              seed=7, temperature=0.9)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    # without include_usage there is no usage chunk; the raw stream ends with [DONE]
    status, headers, body = raw(client.base_url.__str__().rstrip("/") + "/chat/completions", "POST",
                                json.dumps({**kw, "stream": True}), {"Content-Type": "application/json"})
    lines = [x for x in body.decode().splitlines() if x.startswith("data:")]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all("usage" not in json.loads(x[5:]) for x in lines[:-1])


def test_seed_reproduces_and_n_forks(model, client):
    kw = dict(model="rwkv-test", prompt="It was a dark and stormy night", max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c
    r = client.completions.create(seed=42, n=3, **kw)
    assert [x.index for x in r.choices] == [0, 1, 2]
    assert r.choices[0].text == a and len({x.text for x in r.choices}) > 1
    assert r.usage.completion_tokens == 48 and r.usage.prompt_tokens == len(model.tokenizer.encode(kw["prompt"]))


def test_logprobs(model, client):
    r = client.chat.completions.create(model="rwkv-test", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(tops[0])
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    r = client.completions.create(model="rwkv-test", prompt="Once upon a time", max_tokens=5, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    # against the engine: the first token's log-probability
    logits, _ = model.forward(model.tokenizer.encode("Once upon a time"))
    z = logits.astype(np.float64)
    want = z - z.max() - np.log(np.exp(z - z.max()).sum())
    assert lp.token_logprobs[0] == pytest.approx(want.max(), abs=1e-6)


def test_sixteen_concurrent_greedy_requests_equal_each_alone(model, server, client):
    rng = np.random.default_rng(0)
    words = "the sea ship night old man house light rain road king river stone fire tree".split()
    prompts = [" ".join(rng.choice(words, size=n)) for n in rng.integers(1, 60, size=16)]
    results = [None] * 16

    def ask(i):
        results[i] = client.completions.create(model="rwkv-test", prompt=prompts[i], max_tokens=20, **GREEDY)

    steps_before = server.scheduler.steps
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for p, r in zip(prompts, results):
        assert r.choices[0].text == model.complete(p, params=params(max_tokens=20, **GREEDY))
    # they were batched: far fewer steps than 16 requests one after another would take
    assert server.scheduler.steps - steps_before < 16 * 20


def test_the_second_turn_reads_only_the_new_turn(model, client):
    tok = model.tokenizer
    history = [{"role": "system", "content": "You are a storyteller of the sea. " * 20},
               {"role": "user", "content": "Tell me about the old lighthouse keeper and his boat."}]
    # The reply ends at its first full stop (a stop string), so that the turn is complete; the server
    # then reads the reply as the next request will hold it and caches the state after it.
    first = client.chat.completions.create(model="rwkv-test", messages=history, max_tokens=300, seed=1, stop=["."])
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and first.choices[0].finish_reason == "stop"
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "What happened next?"}]
    second = client.chat.completions.create(model="rwkv-test", messages=history, max_tokens=10, seed=1)
    new_turn = tok.encode(chat_turn("User", "What happened next?")) + tok.encode("Assistant:")
    assert second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens == len(new_turn)
    # a conversation sharing only the system prompt resumes after it
    other = [history[0], {"role": "user", "content": "Who are you?"}]
    third = client.chat.completions.create(model="rwkv-test", messages=other, max_tokens=1)
    assert third.usage.prompt_tokens_details.cached_tokens == len(tok.encode(chat_turn("System", history[0]["content"])))


@pytest.fixture(scope="module")
def guarded(model):
    s = rwkvcpu.server.start(model, port=0, max_batch=1, api_key="sekret", max_body_bytes=2000,
                             max_prompt_tokens=50, max_queue=0, model_name="rwkv-test",
                             cors_origins=("http://localhost:3000",))
    yield s
    s.stop()


def test_error_statuses_through_the_client(server, client, guarded):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="rwkv-test", prompt="x", temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="rwkv-test", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="rwkv-test", prompt="x", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    anon = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        anon.models.list()
    ok = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sekret", max_retries=0, timeout=TIMEOUT)
    assert ok.models.list().data[0].id == "rwkv-test"
    with pytest.raises(openai.APIStatusError) as e:
        ok.completions.create(model="rwkv-test", prompt="word " * 60)
    assert e.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as e:
        ok.completions.create(model="rwkv-test", prompt="x" * 3000)
    assert e.value.status_code == 413
    # one slot and no queue: while a stream holds the slot, the next request is refused
    stream = ok.completions.create(model="rwkv-test", prompt="hello", max_tokens=500, stream=True,
                                   logit_bias={"0": -100})     # no end-of-text: it runs until closed
    next(iter(stream))
    with pytest.raises(openai.APIStatusError) as e:
        ok.completions.create(model="rwkv-test", prompt="hello", max_tokens=2)
    assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "server_overloaded"
    stream.close()


BAD_BODIES = [
    b"{", b"[]", b"null", b'"text"', b"\xff\xfe\x00garbage", b'{"model": "rwkv-test"}',
    b'{"model": "rwkv-test", "prompt": 12}', b'{"model": "rwkv-test", "prompt": "x", "n": 0}',
    b'{"model": "rwkv-test", "prompt": "x", "max_tokens": -1}', b'{"model": "rwkv-test", "prompt": [1e99]}',
    b'{"model": "rwkv-test", "prompt": [999999999]}', b'{"model": "rwkv-test", "prompt": [[]]}',
    b'{"model": "rwkv-test", "prompt": "x", "logit_bias": {"abc": 1}}',
    b'{"model": "rwkv-test", "prompt": "x", "logit_bias": {"99999999": 1}}',
    b'{"model": "rwkv-test", "prompt": "x", "stop": [""]}', b'{"model": "rwkv-test", "prompt": "x", "seed": -5}',
    b'{"model": "rwkv-test", "prompt": "x", "top_p": "high"}', b'{"model": "rwkv-test", "prompt": "x", "n": 999}',
    b'{"model": "rwkv-test", "prompt": "x", "suffix": "y"}', b'{"model": "rwkv-test", "prompt": "x", "logprobs": 50}',
    b'{"model": "rwkv-test", "prompt": "\\ud800"}',
]
BAD_CHATS = [
    b'{"model": "rwkv-test", "messages": "hi"}', b'{"model": "rwkv-test", "messages": [{"role": "robot"}]}',
    b'{"model": "rwkv-test", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "rwkv-test", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
    b'{"model": "rwkv-test", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
    b'{"model": "rwkv-test", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}}',
]


@pytest.mark.parametrize("path,body", [("/v1/completions", b) for b in BAD_BODIES] +
                         [("/v1/chat/completions", b) for b in BAD_CHATS])
def test_malformed_bodies_get_400_in_openai_shape(server, path, body):
    status, headers, text = raw(server.url + path, "POST", body, {"Content-Type": "application/json"})
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "Traceback" not in err["message"]


def test_routes_methods_auth_and_cors(server, guarded):
    status, _, text = raw(server.url + "/v2/nothing")
    assert status == 404 and json.loads(text)["error"]["code"] == "unknown_route"
    status, _, text = raw(server.url + "/v1/completions")          # GET on a POST route
    assert status == 405 and "error" in json.loads(text)
    # the key: every route but /health and the page; no CORS unless asked for
    assert raw(guarded.url + "/health")[0] == 200 and raw(guarded.url + "/")[0] == 200
    for route in ("/metrics", "/v1/models"):
        status, _, text = raw(guarded.url + route)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert raw(guarded.url + "/v1/models", headers={"Authorization": "Bearer sekret"})[0] == 200
    origin = {"Origin": "http://localhost:3000"}
    assert "access-control-allow-origin" not in raw(server.url + "/v1/models", headers=origin)[1]
    status, headers, _ = raw(guarded.url + "/v1/models", "OPTIONS",
                             headers={**origin, "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, headers, _ = raw(guarded.url + "/v1/models", headers={**origin, "Authorization": "Bearer sekret"})
    assert headers["access-control-allow-origin"] == "http://localhost:3000"


def test_a_client_that_disconnects_frees_its_sequence(server, client):
    # 2,000 tokens without end-of-text: only the disconnect can end it early
    stream = client.completions.create(model="rwkv-test", prompt="Once", max_tokens=2000, stream=True,
                                       temperature=1.0, logit_bias={"0": -100})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    steps = server.scheduler.steps
    deadline = time.monotonic() + 60
    while metric(server.url, "rwkvcpu_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server.url, "rwkvcpu_active_sequences") == 0
    assert server.scheduler.pool.free == server.scheduler.max_batch
    # freed within a few steps of the disconnect, not after the 2,000 tokens
    assert server.scheduler.steps - steps < 100


def test_start_and_stop_in_process(model):
    before = {t.name for t in threading.enumerate()}
    s = rwkvcpu.server.start(model, port=0)
    assert raw(s.url + "/health")[0] == 200
    port = s.port
    s.stop()
    assert not {t.name for t in threading.enumerate()} - before
    with pytest.raises(ConnectionRefusedError):
        raw(f"http://127.0.0.1:{port}/health")
    # a port in use is one clear error
    with rwkvcpu.server.start(model, port=0) as busy:
        with pytest.raises(rwkvcpu.InvalidArgumentError, match="in use"):
            rwkvcpu.server.Server(model, port=busy.port)


@contextlib.contextmanager
def serve_process(*args):
    """`rwkvcpu serve ARGS --port 0` in a child process: yields (process, its URL read from its stderr);
    stopped (killed if need be) on the way out."""
    proc = subprocess.Popen([sys.executable, "-m", "rwkvcpu.cli.main", "serve", *args, "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        url, deadline = None, time.monotonic() + TIMEOUT
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if "serving" in line:
                url = line.split(" at ", 1)[1].split("/v1", 1)[0]
        assert url and url.startswith("http://127.0.0.1:"), "the command did not say where it serves"
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_serve_command():
    with serve_process("--max-batch", "2") as (proc, url):
        assert raw(url + "/health")[0] == 200
        proc.send_signal(signal.SIGINT)
        # Ctrl-C ends it as it ends every command: exit code 130, no traceback
        assert proc.wait(60) == 130
        assert "Traceback" not in proc.stderr.read()


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    from rwkvcpu.cli import main as cli_main, serve as serve_cli
    monkeypatch.setattr(serve_cli, "SERVER_MODULES", ("fastapi", "no_such_module_rwkvcpu"))
    with pytest.raises(SystemExit) as e:
        cli_main.main(["serve"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install 'rwkvcpu[server]'" in err
