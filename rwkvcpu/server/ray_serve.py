"""Scale-out on Ray Serve (`pip install 'rwkvcpu[ray]'`): replicas of the OpenAI server on a Ray cluster.

The application is two deployments:

- `Replica`: the server itself, `build_app`'s FastAPI app over one model, its scheduler and state
  cache, behind `@serve.ingress`. It reserves as many CPUs (`num_cpus`) as it computes with threads;
  `max_ongoing_requests` is its batch size, so that requests beyond a full batch wait in Ray's
  queue, where the router still chooses.
- `Front`: the HTTP entry. Ray's proxy routes a request before its body is read, so it cannot send
  a conversation to the replica holding its cached state; the front reads the body, takes the
  conversation's text as the routing key (`routing_key`) and forwards the request through a
  DeploymentHandle whose router is Ray's PrefixCacheAffinityRouter: the replica that served the
  longest prefix of that text gets it, unless the replicas' loads differ by more than half a batch.
  The replica runs the request through the same app and streams its ASGI messages back as they come.

With `affinity=False` the application is the Replica deployment alone, which Ray's proxy reaches
directly (power of two choices).

Start it with `rwkvcpu serve MODEL --ray`, with `serve run rwkvcpu.server.ray_serve:build model=PATH
replicas=2`, or from a Serve config file (docs/RAY.md); from Python:

    >>> import ray
    >>> from ray import serve
    >>> from rwkvcpu.server.ray_serve import RayOptions, build
    >>> ray.init()
    >>> serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    >>> serve.run(build(RayOptions(model="rwkv7-0.4b-int8.safetensors", replicas=2)), name="rwkvcpu")
"""

# No `from __future__ import annotations` here: Serve reads build()'s annotation as a class to
# validate a config's args into RayOptions.
import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Literal, Optional, Union

import pydantic
import ray
import starlette.requests
import starlette.responses
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

try:
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter
except ImportError:
    # ray.serve.llm's package needs ray[llm] (vLLM and CUDA wheels); the router itself ships in
    # ray's core wheel, and this is the module the public name re-exports.
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
        PrefixCacheAffinityRouter)
# (Serve's default router; the prefix router builds on it from the same private module)
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

from ..errors import InvalidArgumentError, RwkvCpuError
from ..scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_BUDGET
from ..threads import physical_cores
from . import DEFAULT_CACHE_BYTES, _listen, build_app
from .app import APIError, Guard, Settings
from .metrics import Metrics

log = logging.getLogger("rwkvcpu.server.ray")

APP_NAME = "rwkvcpu"
# Requests one front replica holds at once (streams included): far more than the replicas behind it take.
FRONT_MAX_ONGOING = 4096
# A request that failed on a replica before any of its answer was sent (the replica died) is tried
# again on another this many times.
RETRIES = 2
# The prefix tree of the router (characters of routing keys) is cut back to 90% when it grows past this.
TREE_CHARS = 4_000_000
ROUTED = ("/v1/chat/completions", "/v1/completions")


class RayOptions(pydantic.BaseModel):
    """The application's arguments: `serve run rwkvcpu.server.ray_serve:build KEY=VALUE ...` or a
    Serve config file's `args:`; `rwkvcpu serve --ray` fills them from its flags.

    Attributes:
        model: the model file on every node (anything rwkvcpu.load reads); None: the shipped model.
        replicas: how many, or "auto": between min_replicas and max_replicas by load (Serve's autoscaling).
        min_replicas, max_replicas: the range for "auto" (max_replicas default: the cluster's CPUs / threads).
        target_ongoing_requests: for "auto": the requests per replica it aims at (default: half a batch).
        threads: compute threads per replica, and the CPUs Ray reserves for it (num_cpus).
        max_replicas_per_node: at most this many replicas on one machine (1: one per node); None: no limit.
        affinity: route a conversation to the replica holding its cached state (the front and
            PrefixCacheAffinityRouter); False: Ray's proxy reaches the replicas directly.
        max_batch, prefill_budget, max_queue, cache_bytes, cache_dir: each replica's, as `rwkvcpu serve`'s flags.
        model_name, api_key, cors_origins, max_body_bytes, max_prompt_tokens, max_tokens: the server's Settings.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    model: Optional[str] = None
    replicas: Union[pydantic.PositiveInt, Literal["auto"]] = 1
    min_replicas: pydantic.NonNegativeInt = 1
    max_replicas: Optional[pydantic.PositiveInt] = None
    target_ongoing_requests: Optional[pydantic.PositiveFloat] = None
    threads: pydantic.PositiveInt = 1
    max_replicas_per_node: Optional[pydantic.PositiveInt] = None
    affinity: bool = True
    max_batch: pydantic.PositiveInt = DEFAULT_MAX_BATCH
    prefill_budget: pydantic.PositiveInt = DEFAULT_PREFILL_BUDGET
    max_queue: pydantic.NonNegativeInt = DEFAULT_MAX_QUEUE
    cache_bytes: pydantic.NonNegativeInt = DEFAULT_CACHE_BYTES
    cache_dir: Optional[str] = None
    model_name: Optional[str] = None
    api_key: Optional[str] = None
    cors_origins: tuple = ()
    max_body_bytes: pydantic.PositiveInt = Settings.max_body_bytes
    max_prompt_tokens: pydantic.PositiveInt = Settings.max_prompt_tokens
    max_tokens: pydantic.PositiveInt = Settings.max_tokens

    def server_options(self) -> dict:
        """build_app's keywords for each replica."""
        names = ("threads", "max_batch", "prefill_budget", "max_queue", "cache_bytes", "cache_dir", "model_name",
                 "api_key", "cors_origins", "max_body_bytes", "max_prompt_tokens", "max_tokens")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def settings(self) -> Settings:
        """The Settings the front checks before forwarding (API key, body size)."""
        return Settings(api_key=self.api_key, max_body_bytes=self.max_body_bytes)


@dataclasses.dataclass
class HTTPCall:
    """An HTTP request the front forwards to a replica: the ASGI scope, the whole body, and the routing key."""

    scope: dict
    body: bytes
    affinity_key: str


def routing_key(path: str, body: bytes) -> str:
    """The text a request's cached state grows with: the chat messages so far, or the completion's prompt.

    A conversation's next turn sends its earlier messages again, so its key starts with the key of
    the turn before; the router sends it where that key went. "" (any other route, a body that is
    not JSON) routes by load alone. Roles are left out, as Ray's own normalisation of messages does,
    so that keys share no boilerplate prefix.

    Example:
        >>> routing_key("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}]}')
        '"Hi"\\n'
    """
    if path not in ROUTED:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    if path == "/v1/chat/completions":
        messages = data.get("messages")
        if not isinstance(messages, list):
            return ""
        # one JSON value per message: content given as a string or as parts keys the same way each turn
        return "".join(json.dumps(m.get("content"), ensure_ascii=False) + "\n" for m in messages
                       if isinstance(m, dict))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return "".join(f"{t} " for t in prompt)
    return ""


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    """Ray's PrefixCacheAffinityRouter over the front's routing keys; requests without one go by load.

    Ray's router looks for `.prompt` or `.messages` on the request; ours carry the key the front made
    (HTTPCall.affinity_key), which is also what it records per replica after routing.
    """

    def _extract_text_from_request(self, pending_request) -> str:
        # by attribute, not isinstance: Ray may hold two copies of this module's classes in one
        # process (one loaded by the router's import path, one unpickled with the deployment)
        for arg in pending_request.args or ():
            key = getattr(arg, "affinity_key", None)
            if isinstance(key, str):
                return key
        return ""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None or not self._extract_text_from_request(pending_request):
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request, replica_id, result):
        if pending_request is not None and self._extract_text_from_request(pending_request):
            super().on_request_routed(pending_request, replica_id, result)


@serve.ingress()
class Replica:
    """One model with its scheduler and state cache, serving build_app's app: from Ray's proxy
    directly, or the requests the front forwards (`forward`)."""

    def __init__(self, model: Optional[str], options: dict):
        # (not `self.app`: Ray's ingress wrapper has a property of that name)
        self.server = build_app(model, **options)
        self.scheduler = self.server.state.service.scheduler.start()

    def __serve_build_asgi_app__(self):
        return self.server

    async def forward(self, call: HTTPCall):
        """Run one forwarded request through the app; yield its ASGI messages, in batches as they come.

        The client going away cancels this generator (Ray cancels downstream calls), which cancels
        the app's task and so the scheduler's requests.
        """
        messages: asyncio.Queue = asyncio.Queue()
        end = object()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            # nothing more comes: a disconnect arrives as cancellation
            await asyncio.Future()

        async def send(message):
            messages.put_nowait(message)

        async def run():
            try:
                await self.server(call.scope, receive, send)
            finally:
                messages.put_nowait(end)

        task = asyncio.create_task(run())
        try:
            while True:
                batch = [await messages.get()]
                while not messages.empty():
                    batch.append(messages.get_nowait())
                if batch[-1] is end:
                    if len(batch) > 1:
                        yield batch[:-1]
                    break
                yield batch
            await task
        finally:
            task.cancel()

    def __del__(self):
        if hasattr(self, "scheduler"):
            self.scheduler.stop()


class Front:
    """The HTTP entry with prefix affinity: checks the API key and body size (the server's Guard),
    then forwards each request to a Replica chosen by PrefixAffinityRouter.

    A plain deployment, not an ingress one: Ray allows one @serve.ingress deployment per
    application, and that is the Replica's app. Ray hands a plain deployment a starlette Request
    and answers with the Response it returns by calling it as an ASGI app; the front's Response
    (_ASGIResponse) is its own ASGI app, so the request's messages pass through it untouched.
    """

    def __init__(self, replicas, settings: Settings):
        self.replicas = replicas.options(method_name="forward", stream=True)
        self.app = Guard(self._forward, settings=settings, metrics=Metrics())

    async def __call__(self, request: starlette.requests.Request) -> starlette.responses.Response:
        return _ASGIResponse(self.app)

    async def _forward(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        keep = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
                "headers", "client", "server")
        call = HTTPCall({k: scope[k] for k in keep if k in scope}, body, routing_key(scope["path"], body))
        streaming = started = False
        for attempt in range(RETRIES + 1):
            answer = self.replicas.remote(call)
            try:
                async for batch in answer:
                    for message in batch:
                        if message["type"] == "http.response.start":
                            started = True
                            streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                            for k, v in message.get("headers", ()))
                        await send(message)
                return
            except asyncio.CancelledError:
                answer.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every failure of a replica ends here, as one answer
                error = _replica_error(e)
                if started:
                    # the status is sent: end the stream with the error, as the server ends a failed stream
                    if streaming:
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": b"data: " + json.dumps(error.body()).encode() + b"\n\n"})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                if error.code != "replica_died" or attempt == RETRIES:
                    return await error.response()(scope, receive, send)
                log.warning("retrying a request on another replica: %s", e)


class _ASGIResponse(starlette.responses.Response):
    """A Response that is an ASGI app: Ray calls it with the request's scope, receive and send."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def _replica_error(e: Exception) -> APIError:
    """A replica's failure as the OpenAI-shaped answer the client gets."""
    if isinstance(e, BackPressureError):
        return APIError(503, "the server is busy: every replica's queue is full; try again shortly",
                        code="server_overloaded", headers={"Retry-After": str(int(e.retry_after_s or 1))})
    if isinstance(e, (ray.exceptions.RayActorError, DeploymentUnavailableError)):
        return APIError(503, "the replica serving this request stopped; try again", code="replica_died",
                        headers={"Retry-After": "1"})
    log.error("a replica failed: %s", e)
    return APIError(500, "internal error (see the replicas' logs)", code="internal_error")


def build(options: RayOptions) -> serve.Application:
    """The Serve application (`serve run rwkvcpu.server.ray_serve:build model=PATH replicas=2`).

    Args:
        options: RayOptions (`serve run` and config files give a dict of the same keys).

    Returns:
        the bound application: the Front over the Replica deployment (without affinity, the Replica alone).

    Example:
        >>> serve.run(build(RayOptions(model="/models/rwkv7-0.4b-int8.safetensors", replicas=2)))
    """
    if options.replicas == "auto":
        most = options.max_replicas
        if most is None:
            if not ray.is_initialized():
                raise InvalidArgumentError("replicas=auto needs max_replicas (or a connected Ray cluster to "
                                           "count its CPUs)")
            most = max(1, int(ray.cluster_resources().get("CPU", 1) // options.threads))
        scaling = dict(autoscaling_config=AutoscalingConfig(
            min_replicas=options.min_replicas, max_replicas=max(most, options.min_replicas, 1),
            target_ongoing_requests=options.target_ongoing_requests or max(1, options.max_batch // 2)))
    else:
        scaling = dict(num_replicas=options.replicas)
    if options.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = options.max_replicas_per_node
    if options.affinity:
        # Ray's defaults but two: a conversation's second turn often matches only a few percent of
        # its text (the first prompt, before a long reply), and load outweighs affinity once the
        # replicas' ongoing requests differ by half a batch.
        scaling["request_router_config"] = RequestRouterConfig(
            request_router_class=f"{__name__}.PrefixAffinityRouter",
            request_router_kwargs=dict(imbalanced_threshold=max(1, options.max_batch // 2),
                                       match_rate_threshold=0.01, do_eviction=True,
                                       eviction_threshold_chars=TREE_CHARS,
                                       eviction_target_chars=TREE_CHARS * 9 // 10))
    model = os.path.abspath(options.model) if options.model else None
    replica = serve.deployment(Replica).options(
        name="Replica", ray_actor_options={"num_cpus": options.threads}, max_ongoing_requests=options.max_batch,
        max_queued_requests=options.max_queue, **scaling)
    replica = replica.bind(model, options.server_options())
    if not options.affinity:
        return replica
    front = serve.deployment(Front).options(name="Front", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                            max_ongoing_requests=FRONT_MAX_ONGOING)
    return front.bind(replica, options.settings())


def deploy(options: RayOptions, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve's HTTP proxy on host:port (if Serve is not running yet) and run the application.

    Needs a connected Ray (`ray.init`). Returns once every replica is ready.

    Returns:
        the URL clients use (OpenAI clients: URL + "/v1").
    """
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(options), name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def default_threads(replicas: Union[int, str], *, local: bool) -> int:
    """Threads per replica when none are given.

    On a local instance, this machine's physical cores shared by the replicas ("auto": one each,
    so that as many can start as there are cores); on a cluster, this machine's cores: one replica
    fills a node like this one (decoding is bound by each machine's memory bandwidth, so one replica
    per machine is what scales).
    """
    cores = physical_cores()
    if not local:
        return cores
    return 1 if replicas == "auto" else max(1, cores // replicas)


def free_port(host: str) -> int:
    """A port nobody listens on at `host` now (for port 0: Ray's proxy needs a number)."""
    sock = _listen(host, 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def run(options: RayOptions, *, address: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
        echo=print) -> None:
    """`rwkvcpu serve --ray`: deploy on the cluster at `address` (None: a local Ray instance on this
    machine) and serve until Ctrl-C or SIGTERM; then remove the application (and the local instance).

    A local instance keeps to the loopback interface: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the
    environment before `ray` is imported (the CLI does), otherwise Ray advertises this machine's address.
    """
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RwkvCpuError(f"cannot start or reach Ray{' at ' + address if address else ''}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    stop = threading.Event()
    handlers = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            url = deploy(options, host=host, port=port)
        except RuntimeError as e:
            raise RwkvCpuError(f"Ray Serve could not start the application: {str(e).splitlines()[0]} "
                               f"(the replicas' logs say why)") from None
        scale = {"auto": "autoscaling replicas", 1: "1 replica"}.get(options.replicas, f"{options.replicas} replicas")
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        echo(f"rwkvcpu: serving at {url}/v1 ({scale} on {where}); Ctrl-C stops")
        stop.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
