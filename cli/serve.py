"""`rwkvcpu serve`: the OpenAI-compatible HTTP server and its chat page (the [server] extra)."""

from __future__ import annotations

import importlib.util
import re

import click

from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_BUDGET

from .options import INT, POSITIVE_INT, Number, load_model, threads_option

# What `pip install 'rwkvcpu[server]'` brings; `serve` needs every one.
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")
INSTALL_HINT = "rwkvcpu serve needs the server extra: pip install 'rwkvcpu[server]'"
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
def serve(model_path, host, port, threads, api_key, cors_origins, max_batch, prefill_budget, max_queue,
          cache_size, cache_dir, max_body_size, max_prompt_tokens, max_tokens, model_name):
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
    from rwkvcpu.server import Server

    model = load_model(model_path, threads)
    options = dict(host=host, port=port, max_batch=max_batch, prefill_budget=prefill_budget, max_queue=max_queue,
                   cache_bytes=cache_size, cache_dir=cache_dir, api_key=api_key or None,
                   cors_origins=tuple(cors_origins), max_body_bytes=max_body_size,
                   max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, log_level="info")
    if model_name:
        options["model_name"] = model_name
    server = Server(model, **options)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this port can use "
                   f"the model", err=True)
    click.echo(f"rwkvcpu: serving {server.settings.model_name!r} at {server.url}/v1 "
               f"(chat page {server.url}/); Ctrl-C stops", err=True)
    server.run()
