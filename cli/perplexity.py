"""`rwkvcpu perplexity MODEL TEXTFILE`: how well a model predicts a text."""

from __future__ import annotations

import contextlib
import sys

import click

from rwkvcpu.errors import InvalidArgumentError, open_input

from .options import INT, load_model, threads_option


def read_text(path: str) -> str:
    """The text file (or stdin for "-") as UTF-8; one-line errors for missing or undecodable files."""
    if path == "-":
        return sys.stdin.read()
    try:
        # A pipe is fine (`<(zcat book.gz)`); one that nothing writes to reads as empty, never blocks.
        with open_input(path, "text file", InvalidArgumentError, "r", encoding="utf-8", pipe_ok=True) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if not text:
        raise InvalidArgumentError(f"{path}: the text file is empty; there is nothing to score")
    return text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL")
@click.argument("text_path", metavar="TEXTFILE")
@click.option("--chunk-size", type=INT, default=256, show_default=True,
              help="Tokens per forward call (memory grows with it).")
@click.option("-n", "--max-tokens", type=INT, default=None,
              help="Score only the first N tokens of the text.")
@threads_option
def perplexity(model_path, text_path, chunk_size, max_tokens, threads):
    """Perplexity and bits per byte of MODEL on TEXTFILE (UTF-8; "-" reads stdin).

    The text goes through the model once, chunk by chunk with the state
    carried forward; a progress bar is shown on stderr. Bits per byte
    compares models with different tokenizers; perplexity is per token.

    \b
    Example:
      rwkvcpu perplexity model-int8.safetensors dev.txt --max-tokens 20000
    """
    from rwkvcpu.perplexity import perplexity as score

    if chunk_size < 1:
        raise InvalidArgumentError(f"--chunk-size must be at least 1, got {chunk_size}")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"--max-tokens must be at least 1, got {max_tokens}")
    text = read_text(text_path)
    model = load_model(model_path, threads)
    with contextlib.ExitStack() as stack:
        bars = []

        def progress(done, total):
            # the bar starts once the text is tokenized and its length known
            if not bars:
                bars.append(stack.enter_context(
                    click.progressbar(length=total, label="scoring", file=sys.stderr)))
            bars[0].update(done - bars[0].pos)

        result = score(model, text, chunk_size=chunk_size, max_tokens=max_tokens, progress=progress)
    click.echo(f"tokens:        {result.tokens}")
    click.echo(f"bytes:         {result.bytes}")
    click.echo(f"perplexity:    {result.perplexity:.4f}")
    click.echo(f"bits per byte: {result.bits_per_byte:.4f}")
