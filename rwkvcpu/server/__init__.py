"""rwkvcpu's OpenAI-compatible HTTP server (`pip install 'rwkvcpu[server]'`).

Three layers, each usable alone: the batched engine (Model.step), the scheduler
(rwkvcpu.scheduler: continuous batching, the state cache) and this HTTP layer
(app.py: OpenAI's routes, server-sent events, /metrics, the chat page at /).

From Python, a desktop app starts it on a background thread and stops it:

    >>> import rwkvcpu.server
    >>> server = rwkvcpu.server.start("rwkv7-0.4b-int8.safetensors", port=0)   # 0: any free port
    >>> server.url
    'http://127.0.0.1:41234'
    >>> server.stop()

`rwkvcpu serve MODEL` runs the same server in the foreground.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from typing import Optional

import uvicorn

from ..errors import InvalidArgumentError
from ..scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_BUDGET, Scheduler
from .app import Settings, create_app
from .metrics import Metrics

# The state cache's default budget.
DEFAULT_CACHE_BYTES = 1 << 30

__all__ = ["Server", "Settings", "build_app", "start", "create_app"]


def _load(model, threads):
    if model is None or isinstance(model, (str, os.PathLike)):
        import rwkvcpu
        if model is None:
            from ..models import default_model_path
            model = default_model_path()
        return rwkvcpu.load(model, threads=threads)
    return model


class Server:
    """An rwkvcpu server: a model, its scheduler and state cache, and uvicorn serving the app.

    Args:
        model: a Model, a model file (anything rwkvcpu.load reads), or None for the shipped model.
        host: the address to listen on; 127.0.0.1 (this machine only) unless you mean otherwise.
        port: the port; 0 picks a free one (see `port` and `url` after `start`).
        threads: compute threads for a model loaded here (default: as rwkvcpu.load).
        max_batch: sequences decoding together (and state slots).
        prefill_budget: prompt tokens read per step, over all sequences.
        max_queue: requests that may wait for a slot; beyond, 503 with Retry-After.
        cache_bytes: the state cache's budget in bytes (0: no cache).
        cache_dir: keep the cached states in this folder too, and read them back at start.
        log_level: uvicorn's ("warning" keeps an embedding app's output quiet).
        **settings: Settings fields: model_name, api_key, cors_origins, max_body_bytes,
            max_prompt_tokens, max_tokens.

    Example:
        >>> with rwkvcpu.server.Server("model.safetensors", port=0).start() as server:
        ...     openai.OpenAI(base_url=server.url + "/v1", api_key="-").models.list()
    """

    def __init__(self, model=None, *, host: str = "127.0.0.1", port: int = 8000, threads: Optional[int] = None,
                 max_batch: int = DEFAULT_MAX_BATCH, prefill_budget: int = DEFAULT_PREFILL_BUDGET,
                 max_queue: int = DEFAULT_MAX_QUEUE, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache_dir: Optional[str] = None, log_level: str = "warning", **settings):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise InvalidArgumentError(f"the port must be a number from 0 to 65535, got {port!r}")
        self.app = build_app(model, threads=threads, max_batch=max_batch, prefill_budget=prefill_budget,
                             max_queue=max_queue, cache_bytes=cache_bytes, cache_dir=cache_dir, **settings)
        service = self.app.state.service
        self.model, self.settings, self.metrics = service.model, service.settings, service.metrics
        self.scheduler, self.cache = service.scheduler, service.scheduler.cache
        self.host = host
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="off")
        self._uvicorn = _Uvicorn(config, on_exit=self.scheduler.stop)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """http://HOST:PORT (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve on a background thread; return once it accepts connections.

        Raises:
            RuntimeError: it did not start within `timeout` seconds.
        """
        self.scheduler.start()
        self._thread = threading.Thread(target=self._serve, name="rwkvcpu-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def run(self) -> None:
        """Serve in this thread until Ctrl-C (SIGINT) or SIGTERM."""
        self.scheduler.start()
        try:
            self._serve()
        finally:
            self.scheduler.stop()
            self._socket.close()

    def stop(self) -> None:
        """Stop serving: requests in flight end with an error, the thread is joined. Idempotent."""
        self.scheduler.stop()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._socket.close()

    def _serve(self):
        asyncio.run(self._uvicorn.serve(sockets=[self._socket]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def build_app(model=None, *, threads: Optional[int] = None, max_batch: int = DEFAULT_MAX_BATCH,
              prefill_budget: int = DEFAULT_PREFILL_BUDGET, max_queue: int = DEFAULT_MAX_QUEUE,
              cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: Optional[str] = None, **settings):
    """The server's ASGI app with everything under it: the model, its state cache, metrics and scheduler.

    What a Server serves with uvicorn, and what each Ray Serve replica serves (rwkvcpu.server.ray_serve).
    The scheduler is not started: call `app.state.service.scheduler.start()` before serving, `.stop()` after.

    Args:
        model, threads, max_batch, prefill_budget, max_queue, cache_bytes, cache_dir: as for Server.
        **settings: Settings fields (model_name defaults to the model file's name without extension).

    Returns:
        the FastAPI app; `app.state.service` holds the model, scheduler (its `.cache`), settings and metrics.

    Example:
        >>> app = rwkvcpu.server.build_app("model.safetensors", max_batch=4)
        >>> app.state.service.scheduler.start()     # then serve `app` with any ASGI server
    """
    model = _load(model, threads)
    if "model_name" not in settings:
        settings["model_name"] = os.path.splitext(os.path.basename(model.path))[0] or "rwkv"
    settings = Settings(**settings)
    cache = None
    if cache_bytes:
        from ..cache import StateCache
        cache = StateCache(model, cache_bytes, directory=cache_dir)
    metrics = Metrics()
    scheduler = Scheduler(model, max_batch=max_batch, prefill_budget=prefill_budget, max_queue=max_queue,
                          cache=cache, observer=metrics)
    return create_app(model, settings=settings, scheduler=scheduler, metrics=metrics)


def start(model=None, **options) -> Server:
    """Start a server on a background thread and return it (call `.stop()` when done).

    Args:
        model: a Model, a model file, or None for the shipped model.
        **options: see Server (host, port, max_batch, api_key, cache_bytes, ...).

    Returns:
        the running Server; `server.url` is its address.

    Example:
        >>> server = rwkvcpu.server.start("rwkv7-0.4b-int8.safetensors", port=8000)
        >>> ...   # any OpenAI client at server.url + "/v1"
        >>> server.stop()
    """
    return Server(model, **options).start()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (the port is taken, the address is not ours)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidArgumentError(f"cannot listen on {host!r}: {e.strerror}; pass an address like 127.0.0.1") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "the port is in use: pick another with --port" if e.errno == errno.EADDRINUSE else (
            e.strerror or str(e)).lower()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, ending the scheduler's streams first on Ctrl-C / SIGTERM, so that the
    graceful shutdown does not wait for replies still being generated."""

    def __init__(self, config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame):
        threading.Thread(target=self._on_exit, daemon=True).start()
        super().handle_exit(sig, frame)
