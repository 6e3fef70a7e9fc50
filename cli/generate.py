"""`rwkvcpu generate`: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys

import click

from rwkvcpu.errors import InvalidArgumentError, open_input
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


def read_constraint_file(path, what):
    """The text of a --json-schema or --grammar FILE; one-line errors."""
    with open_input(path, what, InvalidArgumentError, "r", encoding="utf-8") as f:
        try:
            return f.read()
        except UnicodeDecodeError as e:
            raise InvalidArgumentError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_constraint(json_schema, json_object, regex, grammar, choices):
    """The constraint flags as a compiled rwkvcpu.structured.Constraint (or None), checked before the model loads."""
    given = [flag for flag, v in (("--json-schema", json_schema), ("--json", json_object), ("--regex", regex),
                                  ("--grammar", grammar), ("--choice", choices)) if v]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidArgumentError(f"give one of --json-schema, --json, --regex, --grammar, --choice; "
                                   f"got {' and '.join(given)}")
    from rwkvcpu.structured import make_constraint
    for path, key, what in ((json_schema, "json_schema", "JSON schema file"), (grammar, "grammar", "grammar file")):
        if path:
            text = read_constraint_file(path, what)
            try:
                return make_constraint(**{key: text})
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"{path}: {e}") from None
    if json_object:
        return make_constraint(json_object=True)
    if regex is not None:
        return make_constraint(regex=regex)
    return make_constraint(choices=list(choices))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt", required=False)
@model_option
@sampling_options(SamplingParams())
@threads_option
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
@click.option("--stats", is_flag=True, help="Print prompt and generation speed (tokens/s) to stderr.")
@click.option("--json-schema", "json_schema", metavar="FILE",
              help="Output JSON that validates against the JSON Schema in FILE (needs rwkvcpu[structured]).")
@click.option("--json", "json_object", is_flag=True, help="Output a JSON object (needs rwkvcpu[structured]).")
@click.option("--regex", metavar="REGEX",
              help="Output text that matches REGEX in full (Rust regex syntax; needs rwkvcpu[structured]).")
@click.option("--grammar", metavar="FILE",
              help="Output text of the Lark or GBNF grammar in FILE (needs rwkvcpu[structured]).")
@click.option("--choice", "choices", multiple=True, metavar="TEXT",
              help="Output exactly one of the --choice texts (repeatable; needs rwkvcpu[structured]).")
def generate(prompt, model_path, threads, echo, stats, json_schema, json_object, regex, grammar, choices,
             **options):
    """Continue PROMPT with the model, printing the text as it is generated.

    PROMPT is read from stdin when it is absent or "-" (one trailing newline
    is dropped). Generation stops at the end-of-text token, a --stop string
    or --max-tokens; with a constraint (--json-schema, --json, --regex,
    --grammar, --choice; at most one), also when the output is complete.

    \b
    Examples:
      rwkvcpu generate "Once upon a time"
      rwkvcpu generate -t 0 -n 50 "The capital of France is"
      cat notes.txt | rwkvcpu generate --stop '\\n\\n' --seed 1
      rwkvcpu generate -m model-int8.safetensors --top-p 0.7 --stats "Hello"
      rwkvcpu generate --json-schema person.json "A person, as JSON: "
      rwkvcpu generate --regex '[0-9]{4}' "The year was "
      rwkvcpu generate --choice yes --choice no "Is water wet? Answer: "
    """
    from rwkvcpu.generate import generate as start_generation

    sampling = pop_sampling(options, SamplingParams())     # bad values fail before the model loads
    constraint = read_constraint(json_schema, json_object, regex, grammar, choices)
    prompt = read_prompt(prompt)
    model = load_model(model_path, threads)
    run = start_generation(model, prompt, sampling.for_model(model), constraint=constraint)

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
