"""Scale-out on Ray Serve (rwkvcpu.server.ray_serve, `rwkvcpu serve --ray`).

The front's routing key, retries and error answers are driven here with a fake replica handle
(no Ray started). The deployment itself, end to end with the official openai client, is
tests/ray_serve_cases.py, run in a process of its own: Ray takes over signals and threads of the
process that starts it. Where this machine lets a process have its own network namespace
(`unshare --net`: Linux, as root), that process runs in one whose only interface is loopback, so
that Ray's processes, some of which listen on every interface, can reach nothing but themselves.
"""

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the Ray tests need the ray extra (pip install -e '.[ray]')")
pytest.importorskip("openai", reason="the Ray tests need the test extra (pip install -e '.[test]')")

import ray.exceptions  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from rwkvcpu.cli.main import main  # noqa: E402
from rwkvcpu.server.app import Settings  # noqa: E402
from rwkvcpu.server.ray_serve import Front, RayOptions, routing_key  # noqa: E402

HERE = Path(__file__).resolve().parent


def _own_network():
    """The command prefix that runs a command in a new network namespace with loopback up, or None."""
    if sys.platform != "linux" or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    prefix = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    try:
        ok = subprocess.run(prefix + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


def test_serve_on_ray_end_to_end():
    """tests/ray_serve_cases.py: two replicas and the openai client, affinity, clients hanging up, a replica
    killed under load, Ctrl-C."""
    prefix = _own_network() or []
    cmd = prefix + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "ray_serve_cases.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=HERE.parent)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    assert " passed" in r.stdout.splitlines()[-1] and "skipped" not in r.stdout.splitlines()[-1]


# ------------------------------------------------------------------ the routing key


def test_a_conversation_keys_each_turn_with_the_one_before():
    def key(messages):
        return routing_key("/v1/chat/completions", json.dumps({"model": "m", "messages": messages}).encode())

    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    assert key(turn1) and key(turn2).startswith(key(turn1)) and key(turn2) != key(turn1)
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hey"}]
    assert not key(other).startswith(key(turn1))
    # content given as parts keys as its own value, not as nothing
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert key(parts) and key(parts) != key([{"role": "user", "content": ""}])


def test_completions_key_by_prompt_and_the_rest_by_load():
    def key(path, body):
        return routing_key(path, body if isinstance(body, bytes) else json.dumps(body).encode())

    assert key("/v1/completions", {"prompt": "Once upon"}) == "Once upon"
    assert key("/v1/completions", {"prompt": ["Once upon"]}) == "Once upon"
    assert key("/v1/completions", {"prompt": [1, 2, 3]}) == "1 2 3 "
    assert key("/v1/completions", {"prompt": [1, 2, 3, 4]}).startswith(key("/v1/completions", {"prompt": [1, 2, 3]}))
    for path, body in (("/v1/completions", {"prompt": ["a", "b"]}), ("/v1/completions", b"{not json"),
                       ("/v1/completions", b"\xff\xfe"), ("/v1/chat/completions", {"messages": "Hi"}),
                       ("/v1/models", {"prompt": "x"}), ("/v1/completions", [1, 2])):
        assert key(path, body) == ""


# ------------------------------------------------------------------ the front, with a fake replica


def start(status=200, stream=False):
    kind = b"text/event-stream" if stream else b"application/json"
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}


def body(data, more=False):
    return {"type": "http.response.body", "body": data, "more_body": more}


class FakeAnswer:
    """A DeploymentResponseGenerator: batches of ASGI messages, then maybe an exception."""

    def __init__(self, batches, error=None):
        self.batches, self.error, self.cancelled = batches, error, False

    def cancel(self):
        self.cancelled = True

    async def __aiter__(self):
        for b in self.batches:
            yield b
        if self.error is not None:
            raise self.error


class FakeReplicas:
    """The Replica deployment's handle: each call takes the next planned answer and records its argument."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def options(self, **_):
        return self

    def remote(self, call):
        self.calls.append(call)
        return self.answers.pop(0)


def through_front(replicas, path="/v1/completions", payload=None, headers=(), settings=None):
    """(sent ASGI messages) of one request through a Front over `replicas`."""
    front = Front(replicas, settings or Settings())
    data = json.dumps(payload if payload is not None else {"model": "m", "prompt": "Once upon"}).encode()
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(data)).encode()),
                                                                       *headers], "query_string": b""}
    received = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():
        return received.pop(0) if received else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(front.app(scope, receive, send))
    return sent


def test_the_front_forwards_the_body_with_its_key():
    replicas = FakeReplicas(FakeAnswer([[start(), body(b'{"ok": 1}')]]))
    sent = through_front(replicas, payload={"model": "m", "prompt": "Once upon"})
    assert sent == [start(), body(b'{"ok": 1}')]
    (call,) = replicas.calls
    assert call.affinity_key == "Once upon" and call.scope["path"] == "/v1/completions"
    assert json.loads(call.body)["prompt"] == "Once upon"


def test_a_request_is_tried_again_when_its_replica_died_before_answering():
    replicas = FakeReplicas(FakeAnswer([], ray.exceptions.ActorDiedError()),
                            FakeAnswer([], ray.exceptions.ActorDiedError()),
                            FakeAnswer([[start(), body(b'{"ok": 1}')]]))
    assert through_front(replicas) == [start(), body(b'{"ok": 1}')]
    assert len(replicas.calls) == 3 and len({id(c) for c in replicas.calls}) == 1
    # every try dies: one 503 in OpenAI's shape, after RETRIES + 1 tries
    replicas = FakeReplicas(*[FakeAnswer([], ray.exceptions.ActorDiedError()) for _ in range(3)])
    sent = through_front(replicas)
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"1"
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_died" and len(replicas.calls) == 3


def test_a_stream_cut_by_its_replica_ends_with_an_error_event():
    first = [start(stream=True), body(b'data: {"choices": []}\n\n', more=True)]
    replicas = FakeReplicas(FakeAnswer([first], ray.exceptions.ActorDiedError()))
    sent = through_front(replicas)
    assert sent[:2] == first and len(replicas.calls) == 1
    event = sent[2]["body"].decode()
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["error"]["message"] == "the replica serving this request stopped; try again"
    assert sent[3] == body(b"")


def test_a_full_queue_and_a_failing_replica_are_not_retried():
    replicas = FakeReplicas(FakeAnswer([], BackPressureError(num_queued_requests=8, max_queued_requests=8)))
    sent = through_front(replicas)
    assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["error"]["code"] == "server_overloaded"
    replicas = FakeReplicas(FakeAnswer([], RuntimeError("a bug")))
    sent = through_front(replicas)
    assert sent[0]["status"] == 500 and len(replicas.calls) == 1
    assert "a bug" not in sent[1]["body"].decode()


def test_the_front_checks_the_key_and_body_size_before_any_replica():
    replicas = FakeReplicas()
    sent = through_front(replicas, settings=Settings(api_key="secret"))
    assert sent[0]["status"] == 401 and not replicas.calls
    sent = through_front(replicas, settings=Settings(api_key="secret"), headers=[(b"authorization", b"Bearer wrong")])
    assert sent[0]["status"] == 401 and not replicas.calls
    sent = through_front(replicas, payload={"model": "m", "prompt": "x" * 200}, settings=Settings(max_body_bytes=100))
    assert sent[0]["status"] == 413 and not replicas.calls


# ------------------------------------------------------------------ options and the CLI


def test_options_are_checked():
    with pytest.raises(ValueError, match="replicas"):
        RayOptions(replicas=0)
    with pytest.raises(ValueError, match="max_batchh"):
        RayOptions(max_batchh=4)
    assert RayOptions.model_validate({"replicas": "3", "threads": "2"}).replicas == 3
    assert RayOptions.model_validate({"replicas": "auto"}).replicas == "auto"


def test_the_cluster_example_is_a_serve_config_of_this_builder():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((HERE.parent / "docs" / "ray-cluster.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "rwkvcpu.server.ray_serve:build"
    options = RayOptions.model_validate(app.args)
    assert options.replicas == "auto" and options.max_replicas_per_node == 1 and options.api_key
    assert {d.name for d in app.deployments} <= {"Replica", "Front"}


def test_cli_ray_flags_and_install_hint(monkeypatch, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        return e.value.code, capsys.readouterr().err

    assert run("--replicas", "2") == (2, "error: --replicas needs --ray (pip install 'rwkvcpu[ray]')\n")
    assert run("--ray", "--replicas", "two") == (2, "error: --replicas takes a number of replicas or 'auto', "
                                                    "got 'two'\n")
    assert run("--ray-address", "auto", "--port", "0") == (
        2, "error: --port 0 (any free port) works with a local Ray instance only; give the port every node's HTTP "
           "proxy should listen on\n")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert run("--ray") == (2, "error: rwkvcpu serve --ray needs the ray extra: pip install 'rwkvcpu[ray]'\n")
