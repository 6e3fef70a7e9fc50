"""`rwkvcpu serve`: the OpenAI-compatible HTTP server and its chat page (the [server] extra)."""

from __future__ import annotations

import importlib.util
import os
import re

import click

from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_BUDGET

from .options import INT, POSITIVE_INT, Number, load_model, threads_option

# What `pip install 'rwkvcpu[server]'` brings; `serve` needs every one.
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")
INSTALL_HINT = "rwkvcpu serve needs the server extra: pip install 'rwkvcpu[server]'"
# What `pip install 'rwkvcpu[ray]'` brings beyond the server extra (aiohttp: a dependency of ray[serve] only).
RAY_MODULES = ("ray", "aiohttp")
RAY_INSTALL_HINT = "rwkvcpu serve --ray needs the ray extra: pip install 'rwkvcpu[ray]'"
NON_NEGATIVE_INT = Number(int, "an integer >= 0", minimum=0)


class Size(click.ParamType):
    """A size in bytes: 1073741824, 512M, 1G, 64k (powers of 1024)."""

    name = "size"
    UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

    def get_metavar(self, param, ctx=None):
        return "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
        if not m:
            flag = param.opts[-1] if param is not None else "size"
            raise InvalidArgumentError(f"{flag} takes a size like 512M or 2G, got {value!r}")
        return int(float(m.group(1)) * self.UNITS[m.group(2).lower()])


class Replicas(click.ParamType):
    """--replicas: a positive integer or 'auto'."""

    name = "replicas"

    def get_metavar(self, param, ctx=None):
        return "N|auto"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
        raise InvalidArgumentError(f"--replicas takes a number of replicas or 'auto', got {value!r}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 127.0.0.1 is this machine only; 0.0.0.0 opens it to the network "
                   "(then set --api-key).")
@click.option("--port", type=INT, default=8000, show_default=True, help="Port to listen on (0: any free port).")
@threads_option
@click.option("--api-key", envvar="RWKVCPU_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health and the chat page "
                   "(also read from $RWKVCPU_API_KEY, which keeps it out of the process list).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (like http://localhost:3000, or *) call the API (repeatable); "
                   "CORS is off without it.")
@click.option("--max-batch", type=POSITIVE_INT, default=DEFAULT_MAX_BATCH, show_default=True,
              help="Sequences generated together (each holds one state in memory).")
@click.option("--prefill-budget", type=POSITIVE_INT, default=DEFAULT_PREFILL_BUDGET, show_default=True,
              help="Prompt tokens read per step, shared by the prompts being read: lower keeps the other "
                   "streams smooth, higher starts long prompts sooner.")
@click.option("--max-queue", type=NON_NEGATIVE_INT, default=DEFAULT_MAX_QUEUE, show_default=True,
              help="Requests that may wait for a free sequence; beyond, 503 with Retry-After.")
@click.option("--cache-size", type=Size(), default="1G", show_default=True,
              help="Memory for states kept at prompt boundaries (system prompt, chat turns); 0 turns the "
                   "cache off.")
@click.option("--cache-dir", metavar="DIR",
              help="Also keep the cached states in DIR as state files, read back at the next start.")
@click.option("--max-body-size", type=Size(), default="4M", show_default=True,
              help="Larger request bodies get 413.")
@click.option("--max-prompt-tokens", type=POSITIVE_INT, default=32768, show_default=True,
              help="Longer prompts get 413.")
@click.option("--max-tokens", type=POSITIVE_INT, default=2048, show_default=True,
              help="Most tokens one reply may have (and a chat reply's limit when the request gives none).")
@click.option("--model-name", metavar="NAME",
              help="The model id clients send (default: the model file's name without extension).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve replicas of this server on Ray Serve (pip install 'rwkvcpu[ray]'): a local Ray instance "
                   "on this machine, or the cluster at --ray-address. --threads is then per replica.")
@click.option("--ray-address", metavar="ADDR",
              help="The Ray cluster to deploy on (like head-node:6379, or auto: the cluster this machine has joined); "
                   "implies --ray.")
@click.option("--replicas", type=Replicas(), default="1", show_default=True,
              help="With --ray: how many replicas, or 'auto' to scale with load from 1 to the CPUs Ray has.")
@click.option("--affinity/--no-affinity", default=True, show_default=True,
              help="With --ray: send a conversation's later turns to the replica that holds its cached state.")
def serve(model_path, host, port, threads, api_key, cors_origins, max_batch, prefill_budget, max_queue,
          cache_size, cache_dir, max_body_size, max_prompt_tokens, max_tokens, model_name, use_ray, ray_address,
          replicas, affinity):
    """Serve MODEL (default: the shipped model) over the OpenAI API, with a chat page at /.

    \b
    Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions
    (streaming with server-sent events), GET /health, GET /metrics (Prometheus), GET / (chat page).
    Requests are batched: --max-batch sequences generate together.

    \b
      rwkvcpu serve rwkv7-0.4b-int8.safetensors --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "rwkv7-0.4b-int8", "messages": [{"role": "user", "content": "Hi!"}]}'
    """
    if any(importlib.util.find_spec(m) is None for m in SERVER_MODULES):
        raise click.ClickException(INSTALL_HINT)
    use_ray = use_ray or ray_address is not None
    if not use_ray and replicas != 1:
        raise InvalidArgumentError("--replicas needs --ray (pip install 'rwkvcpu[ray]')")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this port can use "
                   f"the model", err=True)
    options = dict(max_batch=max_batch, prefill_budget=prefill_budget, max_queue=max_queue,
                   cache_bytes=cache_size, cache_dir=cache_dir, api_key=api_key or None,
                   cors_origins=tuple(cors_origins), max_body_bytes=max_body_size,
                   max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens)
    if model_name:
        options["model_name"] = model_name
    if use_ray:
        return serve_on_ray(model_path, host, port, threads, ray_address, replicas, affinity, options)
    from rwkvcpu.server import Server

    server = Server(load_model(model_path, threads), host=host, port=port, log_level="info", **options)
    click.echo(f"rwkvcpu: serving {server.settings.model_name!r} at {server.url}/v1 "
               f"(chat page {server.url}/); Ctrl-C stops", err=True)
    server.run()


def serve_on_ray(model_path, host, port, threads, address, replicas, affinity, options):
    """`serve --ray`: check the model here when Ray runs here, then deploy and serve until Ctrl-C."""
    if any(importlib.util.find_spec(m) is None for m in RAY_MODULES):
        raise click.ClickException(RAY_INSTALL_HINT)
    if address is None:
        # A local instance keeps to the loopback interface, as `rwkvcpu serve` does; Ray reads this
        # when it is imported (below), and its processes inherit it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # a bad model file is one line now, not a replica failing to start after Ray's start-up
        load_model(model_path, threads)
    if port == 0 and address is not None:
        raise InvalidArgumentError("--port 0 (any free port) works with a local Ray instance only; give the port "
                                   "every node's HTTP proxy should listen on")
    from rwkvcpu.server.ray_serve import RayOptions, default_threads, free_port, run

    if port == 0:
        port = free_port(host)
    if threads is None:
        threads = default_threads(replicas, local=address is None)
    run(RayOptions(model=model_path, replicas=replicas, threads=threads, affinity=affinity, **options),
        address=address, host=host, port=port, echo=lambda line: click.echo(line, err=True))
