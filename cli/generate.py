"""`rwkvcpu generate`: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys

import click

from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.sampling import SamplingParams

from .options import (lenient_stdin, load_model, model_option, pop_sampling, sampling_options, text_stdout,
                      threads_option)


def read_prompt(prompt):
    """The prompt argument, or stdin when it is absent or "-"."""
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise InvalidArgumentError(
                'no prompt: give one as an argument (rwkvcpu generate "Once upon a time") or pipe it on stdin')
        lenient_stdin()
        prompt = sys.stdin.read()
        # `echo text | rwkvcpu generate` should continue "text", not "text\n"
        if prompt.endswith("\n"):
            prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt[:-1]
    if not prompt:
        raise InvalidArgumentError("the prompt is empty: give some text for the model to continue")
    return prompt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt", required=False)
@model_option
@sampling_options(SamplingParams())
@threads_option
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
@click.option("--stats", is_flag=True, help="Print prompt and generation speed (tokens/s) to stderr.")
def generate(prompt, model_path, threads, echo, stats, **options):
    """Continue PROMPT with the model, printing the text as it is generated.

    PROMPT is read from stdin when it is absent or "-" (one trailing newline
    is dropped). Generation stops at the end-of-text token, a --stop string
    or --max-tokens.

    \b
    Examples:
      rwkvcpu generate "Once upon a time"
      rwkvcpu generate -t 0 -n 50 "The capital of France is"
      cat notes.txt | rwkvcpu generate --stop '\\n\\n' --seed 1
      rwkvcpu generate -m model-int8.safetensors --top-p 0.7 --stats "Hello"
    """
    from rwkvcpu.generate import generate as start_generation

    sampling = pop_sampling(options, SamplingParams())     # bad values fail before the model loads
    prompt = read_prompt(prompt)
    model = load_model(model_path, threads)
    run = start_generation(model, prompt, sampling.for_model(model))

    out = text_stdout()
    if echo:
        out.write(prompt)
        out.flush()
    last = prompt if echo else ""
    for chunk in run:
        out.write(chunk)
        out.flush()
        last = chunk
    if out.isatty() and not last.endswith("\n"):
        out.write("\n")
    out.flush()
    if stats:
        click.echo(run.stats.summary() + f"; stopped by {run.finish_reason}", err=True)
