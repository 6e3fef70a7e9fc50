"""Options shared by `generate` and `chat`: the model, and every sampling option.

Bad values raise InvalidArgumentError (one line, exit code 2 through
rwkvcpu.cli.main) rather than click's several-line usage error.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import re
import sys

from typing import NamedTuple

import click

from rwkvcpu.errors import InvalidArgumentError, ModelFormatError
from rwkvcpu.sampling import SamplingParams, make_params


class Number(click.ParamType):
    """A number option whose bad values are one-line InvalidArgumentErrors."""

    def __init__(self, cast, what, minimum=None):
        self.cast, self.what, self.minimum = cast, what, minimum
        self.name = "integer" if cast is int else "number"

    def get_metavar(self, param, ctx=None):
        return "INT" if self.cast is int else "FLOAT"

    def convert(self, value, param, ctx):
        flag = param.opts[-1] if param is not None else "value"
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = self.cast(value)
            else:
                number = self.cast(str(value).strip())
        except ValueError:
            raise InvalidArgumentError(f"{flag} must be {self.what}, got {value!r}") from None
        if self.minimum is not None and number < self.minimum:
            raise InvalidArgumentError(f"{flag} must be {self.what}, got {value!r}")
        return number


INT = Number(int, "an integer")
FLOAT = Number(float, "a number")
POSITIVE_INT = Number(int, "a positive integer", minimum=1)
# -n/--max-tokens: the CLI's 0 is the API's None (no limit), so the CLI checks its own convention.
MAX_TOKENS = Number(int, "an integer >= 0 (0 means no limit)", minimum=0)


class TokenBias(click.ParamType):
    """ID=BIAS, for --logit-bias."""

    name = "ID=BIAS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        token, sep, bias = str(value).partition("=")
        try:
            if not sep:
                raise ValueError
            return int(token), float(bias)
        except ValueError:
            raise InvalidArgumentError(f"--logit-bias takes TOKEN_ID=BIAS (like 187=-2.5), got {value!r}") from None


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line (``\\n``, ``\\t``, ``\\u00e9``) as characters."""
    try:
        return codecs.decode(text.encode("utf-8", "surrogatepass"), "unicode_escape") if "\\" in text else text
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"bad backslash escape in {text!r}") from None


def lenient_stdin():
    """Make stdin carry bytes that are not UTF-8 as surrogate escapes instead of raising.

    Under a UTF-8 locale (or PYTHONIOENCODING=utf-8) Python decodes stdin
    strictly, and one stray Latin-1 byte would end a chat or a piped prompt with a traceback.
    Escaped, such bytes reach the tokenizer, which encodes them (World and
    byte vocabularies) or refuses the message in one line (Hugging Face ones).
    """
    try:
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass


def text_stdout():
    """sys.stdout, set to replace characters its encoding cannot show instead of raising.

    A model can write any character; a pipe on a legacy code page must not
    turn an emoji into a traceback.
    """
    out = sys.stdout
    try:
        out.reconfigure(errors="replace")
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass
    return out


def model_option(f):
    return click.option(
        "-m", "--model", "model_path", metavar="FILE",
        help="Model file (.safetensors from `rwkvcpu convert`; a .pth, rwkv.cpp .bin or Hugging Face folder is converted in memory to int8). Default: the model shipped with rwkvcpu.",
    )(f)


def threads_option(f):
    return click.option("--threads", type=POSITIVE_INT, default=None, metavar="N",
                        help="CPU threads for the model (default: one per physical core; one for a model reading under 64 MB per token).")(f)


def sampling_options(defaults):
    """Decorator adding every sampling option, showing `defaults` (a SamplingParams)."""
    d = defaults
    opts = [
        click.option("-n", "--max-tokens", type=MAX_TOKENS, default=d.max_tokens, show_default=True,
                     help="Most tokens to generate; 0 for no limit."),
        click.option("-t", "--temperature", type=FLOAT, default=d.temperature, show_default=True,
                     help="Randomness; 0 always picks the most likely token (greedy)."),
        click.option("--top-p", type=FLOAT, default=d.top_p, show_default=True,
                     help="Keep the fewest most likely tokens whose probabilities reach P; in (0, 1], 1 = off."),
        click.option("--top-k", type=INT, default=d.top_k, show_default=True,
                     help="Keep the K most likely tokens; 0 = off."),
        click.option("--min-p", type=FLOAT, default=d.min_p, show_default=True,
                     help="Keep tokens at least this fraction as likely as the best one; 0 = off."),
        click.option("--presence-penalty", type=FLOAT, default=d.presence_penalty, show_default=True,
                     help="Subtracted from the logit of every token already generated."),
        click.option("--frequency-penalty", type=FLOAT, default=d.frequency_penalty, show_default=True,
                     help="Subtracted again for each (decayed) occurrence of a generated token."),
        click.option("--penalty-decay", type=FLOAT, default=d.penalty_decay, show_default=True,
                     help="Occurrence counts are multiplied by this at every token (ChatRWKV's decay)."),
        click.option("--repetition-penalty", type=FLOAT, default=d.repetition_penalty, show_default=True,
                     help="Divide positive / multiply negative logits of tokens already in the text; 1 = off."),
        click.option("--logit-bias", type=TokenBias(), multiple=True, metavar="ID=BIAS",
                     help="Add BIAS to the logit of token ID (repeatable)."),
        click.option("--ban", "banned", type=INT, multiple=True, metavar="ID",
                     help="Never generate token ID (repeatable)."),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help="Stop when the output contains TEXT, which is not printed; \\n and other "
                          "escapes are understood (repeatable)."),
        click.option("--stop-token", "stop_token", type=INT, multiple=True, metavar="ID",
                     help="Stop when token ID is generated (repeatable), besides end-of-text."),
        click.option("--ignore-eos", is_flag=True,
                     help="Do not stop at the end-of-text token (token 0 of World models)."),
        click.option("--seed", type=INT, default=None,
                     help="Random seed: the same seed, model, prompt and options give the same text."),
    ]
    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return decorate


SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "penalty_decay", "repetition_penalty", "logit_bias", "banned",
                 "stop", "stop_token", "ignore_eos", "seed")

# The words rwkvcpu.sampling's messages use for a value (the InvalidArgumentError's
# `field`) -> the flags that set it: the rules stay there, the words are ours.
FLAG_NAMES = {
    "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
    "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty",
    "penalty_decay": "--penalty-decay", "repetition_penalty": "--repetition-penalty",
    "max_tokens": "--max-tokens", "seed": "--seed",
    "logit_bias": "--logit-bias", "logit_bias token id": "--logit-bias token id",
    "logit_bias[{k}]": "--logit-bias {k}=BIAS",
    "banned_tokens": "--ban", "banned token id": "--ban token id",
    "stop": "--stop", "stop strings": "--stop values",
    "stop_tokens": "--stop-token", "stop token id": "--stop-token id",
}


@contextlib.contextmanager
def in_flag_words():
    """Sampling errors raised in the block name the flag instead of the keyword: "--top-p must be
    > 0 (--top-p is in (0, 1]; ...), got 0" for the API's "top_p must be > 0 (top_p is ...), got 0"."""
    try:
        yield
    except InvalidArgumentError as e:
        bias = re.fullmatch(r"logit_bias\[(.*)\]", e.field or "")
        flag = f"--logit-bias {bias[1]}=BIAS" if bias else FLAG_NAMES.get(e.field)
        if flag is None:
            raise
        # The value comes last, after ", got ": only the words before it are the value's name.
        head, got, value = str(e).rpartition(", got ") if ", got " in str(e) else (str(e), "", "")
        raise InvalidArgumentError(head.replace(e.field, flag) + got + value, flag) from None


class Sampling(NamedTuple):
    """A command's sampling flags: the parameters, checked, and what waits for the model.

    params.stop_tokens holds the --stop-token ids alone until for_model adds
    end-of-text, whose id is only known once the model is loaded.
    """
    params: SamplingParams
    stop_ids: tuple
    ignore_eos: bool

    def for_model(self, model) -> SamplingParams:
        """The parameters with end-of-text (unless --ignore-eos) among the stop tokens,
        every token id checked against the model's vocabulary."""
        from rwkvcpu.generate import model_tokenizer
        eos = model_tokenizer(model).eos_token_id
        base = [] if self.ignore_eos or eos is None else [eos]
        with in_flag_words():
            params = make_params(self.params, stop_tokens=base + [t for t in self.stop_ids if t not in base])
            params.check_vocab(model.config.vocab_size)
        return params


def pop_sampling(kwargs: dict, defaults: SamplingParams) -> Sampling:
    """Take the sampling options out of a command's kwargs, on top of `defaults`.

    Raises:
        InvalidArgumentError: a bad value, named by its flag (before any model loads).
    """
    o = {k: kwargs.pop(k) for k in SAMPLING_KEYS}
    bias = {}
    for token, value in o["logit_bias"]:
        bias[token] = bias.get(token, 0.0) + value
    with in_flag_words():
        params = make_params(
            defaults,
            max_tokens=o["max_tokens"] or None,
            temperature=o["temperature"], top_p=o["top_p"], top_k=o["top_k"], min_p=o["min_p"],
            presence_penalty=o["presence_penalty"], frequency_penalty=o["frequency_penalty"],
            penalty_decay=o["penalty_decay"], repetition_penalty=o["repetition_penalty"],
            logit_bias=bias, banned_tokens=list(o["banned"]),
            stop=[unescape(s) for s in o["stop"]],
            stop_tokens=list(o["stop_token"]),
            seed=o["seed"],
        )
    return Sampling(params, tuple(o["stop_token"]), o["ignore_eos"])


def resolve_model_path(model_path) -> str:
    """The model file to load: --model, or the shipped one; a one-line error if it is not there."""
    if model_path is None:
        from rwkvcpu.models import default_model_path
        path = str(default_model_path())
        if not os.path.exists(path):
            raise ModelFormatError(
                f"the model shipped with rwkvcpu is not installed ({path} is missing); "
                f"pass a model file with --model FILE")
        return path
    path = os.path.expanduser(str(model_path))
    if not os.path.exists(path):
        raise ModelFormatError(f"{path}: no such model file")
    # A folder may be a Hugging Face checkpoint: rwkvcpu.load reads it or says why not.
    if not os.access(path, os.R_OK):
        raise ModelFormatError(f"{path}: model file is not readable (permission denied)")
    return path


def load_model(model_path, threads=None):
    """Load the model for a command (the engine is imported here, not at startup)."""
    import rwkvcpu
    path = resolve_model_path(model_path)
    try:
        return rwkvcpu.load(path, threads=threads)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read the model file ({e.strerror or e})") from None
