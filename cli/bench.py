"""`rwkvcpu bench MODEL`: how fast a model runs on this machine."""

from __future__ import annotations

import json
import time

import click

from .options import INT, threads_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@threads_option
@click.option("-n", "--tokens", type=INT, default=200, show_default=True, metavar="N",
              help="Decode steps timed (the median is reported).")
@click.option("--prompt", "prompt_tokens", type=INT, default=512, show_default=True, metavar="N",
              help="Length of the prompt timed for prompt (prefill) speed.")
@click.option("--no-bandwidth", is_flag=True,
              help="Skip measuring the memory bandwidth (by streaming the model's weights between decode steps) "
                   "and the roofline.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench(model_path, threads, tokens, prompt_tokens, no_bandwidth, as_json):
    """Time MODEL: load, first token, decode and prompt speed, peak memory,
    and decode against the memory-bandwidth floor (the roofline).

    MODEL is a .safetensors file from `rwkvcpu convert`: convert other
    checkpoints first, since the figures are the file's.

    Decoding one token reads every weight once, so it cannot beat
    (bytes of weights) / (memory bandwidth); the bandwidth is measured while
    decoding, by streaming the same bytes. Close other busy programs first:
    they share the cores and the memory bus.

    \b
    Examples:
      rwkvcpu bench model-int8.safetensors
      rwkvcpu bench model-int4.safetensors --threads 1 -n 50 --json
    """
    from rwkvcpu import bench as B
    from rwkvcpu.errors import InvalidArgumentError

    start = time.perf_counter()
    if tokens < 1 or prompt_tokens < 1:
        raise InvalidArgumentError("--tokens and --prompt must be at least 1")
    if max(tokens, prompt_tokens) > B.MAX_TOKENS:
        raise InvalidArgumentError(f"--tokens and --prompt must be at most {B.MAX_TOKENS:,}, got "
                                   f"{max(tokens, prompt_tokens):,}")
    result = B.measure(model_path, threads=threads, decode_tokens=tokens, prompt_tokens=prompt_tokens,
                       start=start, bandwidth=not no_bandwidth)
    if not no_bandwidth:
        result.update(B.roofline(result))
    click.echo(json.dumps(result) if as_json else B.format_report(result))
