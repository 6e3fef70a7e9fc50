"""Choosing the next token from the logits.

The order of operations, each a small function below:

1. ``logit_bias`` is added and ``banned_tokens`` are set to -inf.
2. Presence and frequency penalties, as ChatRWKV applies them: every token
   generated so far loses ``presence_penalty + frequency_penalty * count``,
   where ``count`` is its number of occurrences, each multiplied by
   ``penalty_decay`` at every step after it (so old repetitions are forgiven).
3. Repetition penalty (CTRL / Hugging Face style): a token already in the
   context (prompt or output) has a positive logit divided by the penalty and
   a negative one multiplied by it.
4. ``temperature == 0``: the most likely token (greedy), nothing random.
5. Otherwise top-k, top-p and min-p each choose a set of the most probable
   tokens of the same distribution (softmax of the logits after steps 1-3);
   the token is drawn from their intersection with probabilities
   ``softmax(logits / temperature)`` renormalised over it. Filtering before
   the temperature is what ChatRWKV and llama.cpp's default chain do: a high
   temperature flattens the choice among plausible tokens without letting
   implausible ones in.

Stop strings, stop tokens and ``max_tokens`` are checked by the generation
loop (rwkvcpu/generate.py); they live in SamplingParams so that one object
says everything about how to generate.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import InvalidArgumentError, NonFiniteError


# Every message names the bad value by the words `name` (a field, or e.g. "banned token id")
# and keeps the value itself after a last ", got ": the error's `field` is those words, which
# a front end may replace by its own (the CLI's flags, cli/options.py).

def _real(name, value, hint="", lo=None, hi=None, lo_open=False, allow_neg_inf=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}", name)
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_neg_inf and value < 0)):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value}", name)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise InvalidArgumentError(f"{name} must be {bound}{hint}, got {value:g}", name)
    if hi is not None and value > hi:
        raise InvalidArgumentError(f"{name} must be <= {hi:g}{hint}, got {value:g}", name)
    return value


def _int(name, value, hint="", lo=None, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}", name)
    value = int(value)
    if lo is not None and value < lo:
        raise InvalidArgumentError(f"{name} must be >= {lo}{hint}, got {value}", name)
    return value


def _seq(name, value, one_string=False):
    if isinstance(value, (str, bytes)) and not one_string:
        raise InvalidArgumentError(f"{name} must be a list, got {value!r}", name)
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a list, got {value!r}", name) from None


# The rules of the single-valued options: field -> (check, bounds, range hint).
# "{name}" in a hint is the option's name.
_RULES = {
    "temperature": (_real, dict(lo=0.0), "0 means greedy"),
    "top_p": (_real, dict(lo=0.0, lo_open=True, hi=1.0), "{name} is in (0, 1]; 1 turns it off"),
    "top_k": (_int, dict(lo=0), "0 turns it off"),
    "min_p": (_real, dict(lo=0.0, hi=1.0), "{name} is in [0, 1]; 0 turns it off"),
    "presence_penalty": (_real, {}, ""),
    "frequency_penalty": (_real, {}, ""),
    "penalty_decay": (_real, dict(lo=0.0, hi=1.0), "{name} is in [0, 1]"),
    "repetition_penalty": (_real, dict(lo=0.0, lo_open=True), "1 turns it off"),
    "max_tokens": (_int, dict(lo=0, optional=True), "None means no limit"),
    "seed": (_int, dict(lo=0, optional=True), ""),
}


def _checked(values: Mapping) -> dict:
    """Every field of `values` (one per SamplingParams field) checked and normalised.

    Args:
        values: field -> value.

    Raises:
        InvalidArgumentError: the first value out of range or of the wrong type; its
            `field` is the words naming it ("top_p", "banned token id", "logit_bias[7]", ...).
    """
    out = {}
    for field, (check, bounds, hint) in _RULES.items():
        out[field] = check(field, values[field], f" ({hint.format(name=field)})" if hint else "", **bounds)
    bias = values["logit_bias"]
    if not isinstance(bias, Mapping):
        raise InvalidArgumentError(f"logit_bias must map token ids to numbers, got {bias!r}", "logit_bias")
    out["logit_bias"] = {_int("logit_bias token id", k, lo=0):
                         _real(f"logit_bias[{k}]", v, allow_neg_inf=True) for k, v in bias.items()}
    out["banned_tokens"] = tuple(_int("banned token id", t, lo=0)
                                 for t in _seq("banned_tokens", values["banned_tokens"]))
    stops = _seq("stop", values["stop"], one_string=True)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidArgumentError(f"stop strings must be non-empty strings, got {s!r}", "stop strings")
    out["stop"] = stops
    if values["stop_tokens"] is not None:
        out["stop_tokens"] = tuple(_int("stop token id", t, lo=0) for t in _seq("stop_tokens", values["stop_tokens"]))
    else:
        out["stop_tokens"] = None
    return out


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop; validated on construction.

    Attributes:
        temperature: >= 0; 0 means greedy (always the most likely token).
        top_p: in (0, 1]; keep the smallest set of most likely tokens whose
            probabilities sum to at least top_p (1: off).
        top_k: >= 0; keep the k most likely tokens (0: off).
        min_p: in [0, 1]; keep tokens at least min_p times as likely as the
            most likely one (0: off).
        presence_penalty: subtracted from the logit of every token generated so far.
        frequency_penalty: subtracted once more per (decayed) occurrence.
        penalty_decay: in [0, 1]; occurrence counts are multiplied by it at
            every step (ChatRWKV: 0.996).
        repetition_penalty: > 0; CTRL-style penalty on tokens of the prompt
            and the output (1: off).
        logit_bias: token id -> value added to its logit (-inf bans it).
        banned_tokens: token ids never generated.
        stop: strings that end the generation; they are not part of the output.
        stop_tokens: token ids that end the generation (not part of the
            output); None means the tokenizer's end-of-text token (0 for
            World models), if it has one.
        max_tokens: most tokens to generate; None for no limit.
        seed: seeds the random generator: same seed, model, prompt and
            options give the same text. None draws a fresh seed.

    Raises:
        InvalidArgumentError: a value is out of range or of the wrong type.

    Example:
        >>> SamplingParams(temperature=0.7, top_p=0.9, stop=["\\n\\n"], seed=42)
        >>> SamplingParams(top_p=1.5)
        Traceback (most recent call last):
        rwkvcpu.errors.InvalidArgumentError: top_p must be <= 1 (top_p is in (0, 1]; 1 turns it off), got 1.5
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)
    banned_tokens: Sequence[int] = ()
    stop: Sequence[str] = ()
    stop_tokens: Optional[Sequence[int]] = None
    max_tokens: Optional[int] = 256
    seed: Optional[int] = None

    def __post_init__(self):
        checked = _checked({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name, value in checked.items():
            # A frozen dataclass: fields are set through object.__setattr__.
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        return make_params(self, **changes)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise InvalidArgumentError if a token id named here is outside the model's vocabulary.

        Args:
            vocab_size: the model's.
        """
        named = [("logit_bias token id", t) for t in self.logit_bias]
        named += [("banned token id", t) for t in self.banned_tokens]
        named += [("stop token id", t) for t in self.stop_tokens or ()]
        for what, t in named:
            if t >= vocab_size:
                raise InvalidArgumentError(
                    f"{what} {t} is outside the model's vocabulary (0 .. {vocab_size - 1})", what)
        if len(set(self.banned_tokens)) >= vocab_size:
            raise InvalidArgumentError("every token is banned: nothing could be generated")


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def make_params(base: Optional[SamplingParams] = None, **options) -> SamplingParams:
    """SamplingParams from keyword options on top of `base` (default: the defaults).

    Args:
        base: the values of the options not given.
        **options: SamplingParams fields.

    Raises:
        InvalidArgumentError: an unknown option name or a bad value, named by its
            keyword (the error's `field`).

    Example:
        >>> make_params(temperature=0)
        SamplingParams(temperature=0.0, ...)
        >>> make_params(top_p=0)
        Traceback (most recent call last):
        rwkvcpu.errors.InvalidArgumentError: top_p must be > 0 (top_p is in (0, 1]; 1 turns it off), got 0
    """
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise InvalidArgumentError(
            f"unknown sampling option {unknown[0]!r}; the options are {', '.join(FIELDS)}")
    if base is None:
        return SamplingParams(**options)
    return dataclasses.replace(base, **options)


# ---------------------------------------------------------------------------
# The steps, as pure functions on float64 logits (V,)


def softmax(logits: np.ndarray) -> np.ndarray:
    """exp(logits - max), normalised; -inf logits get probability 0."""
    z = np.exp(logits - logits.max())
    return z / z.sum()


def apply_penalties(logits: np.ndarray, seen: np.ndarray, occurrence: np.ndarray,
                    presence: float, frequency: float) -> None:
    """ChatRWKV's penalties, in place: logits[t] -= presence + frequency * occurrence[t] for t in seen.

    Args:
        logits: (V,) float64, changed in place.
        seen: (n,) int64, the distinct tokens generated so far.
        occurrence: (V,) float64, decayed occurrence counts of generated tokens.
    """
    if (presence or frequency) and seen.shape[0]:
        logits[seen] -= presence + frequency * occurrence[seen]


def apply_repetition_penalty(logits: np.ndarray, in_context: np.ndarray, penalty: float) -> None:
    """CTRL-style repetition penalty, in place, on the tokens marked in `in_context` (V,) bool."""
    if penalty != 1.0:
        x = logits[in_context]
        logits[in_context] = np.where(x > 0, x / penalty, x * penalty)


# Histogram buckets of kept_tokens: 1/8 nat wide, 64 nats deep (exp(-64) ~ 1e-28).
BUCKET_WIDTH = 0.125
N_BUCKETS = 512


def _ordered(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids sorted most probable first, ties by lower id."""
    return ids[np.lexsort((ids, -logits[ids]))]


def kept_tokens(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> Optional[np.ndarray]:
    """The tokens top-k, top-p and min-p all keep, for the distribution softmax(logits).

    Each filter keeps a run of the most probable tokens (ties: lower id
    first); the intersection is the shortest of the three runs: top-k the
    first k; top-p the smallest run whose probability mass is >= top_p;
    min-p the tokens with probability >= min_p * the largest probability.

    One histogram pass (kernels/sampling.py) finds where each run ends; only
    the tokens of the bucket holding a cut are sorted.

    Args:
        logits: (V,) float64, finite or -inf, with a finite maximum.

    Returns:
        the kept ids (deterministic order, not sorted), or None when no
        filter is active (every token is kept).
    """
    from .kernels.sampling import logit_histogram
    V = logits.shape[0]
    if not 0 < top_k < V and top_p >= 1.0 and min_p <= 0.0:
        return None
    top = float(logits.max())
    bucket = np.empty(V, np.int32)
    count = np.empty(N_BUCKETS, np.int64)
    mass = np.empty(N_BUCKETS, np.float64)
    total = logit_histogram(logits, top, BUCKET_WIDTH, bucket, count, mass)
    n = top_k if 0 < top_k < V else V
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= top + log(min_p)
        n = min(n, int(np.count_nonzero(logits >= top + math.log(min_p))))
    if top_p < 1.0:
        target = top_p * total
        cum_mass = np.cumsum(mass)
        b = min(int(np.searchsorted(cum_mass, target, side="left")), N_BUCKETS - 1)
        inside = _ordered(logits, np.flatnonzero(bucket == b))
        before = float(cum_mass[b - 1]) if b else 0.0
        run = before + np.cumsum(np.exp(logits[inside] - top))
        j = min(int(np.searchsorted(run, target, side="left")) + 1, inside.shape[0])
        n = min(n, int(count[:b].sum()) + j)
    n = max(n, 1)
    # the first n tokens: whole buckets before the one where n falls, then its first few
    cum_count = np.cumsum(count)
    b = int(np.searchsorted(cum_count, n, side="left"))
    head = np.flatnonzero(bucket < b)
    tail = _ordered(logits, np.flatnonzero(bucket == b))[:n - head.shape[0]]
    return np.concatenate([head, tail])


def draw(logits: np.ndarray, ids: Optional[np.ndarray], temperature: float, rng: np.random.Generator) -> int:
    """Draw one token from softmax(logits[ids] / temperature).

    Args:
        logits: (V,) float64.
        ids: the candidate token ids, or None for all.
        temperature: > 0.
        rng: the generation's random generator (one uniform draw per token).
    """
    z = logits if ids is None else logits[ids]
    z = (z - z.max()) / temperature
    cdf = np.cumsum(np.exp(z))
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    i = min(i, cdf.shape[0] - 1)
    return int(i if ids is None else ids[i])


class Sampler:
    """Chooses tokens for one generation; remembers what it generated for the penalties.

    Args:
        params: the SamplingParams (their token ids are checked against vocab_size).
        vocab_size: the number of logits.
        rng: a numpy Generator; default: seeded from params.seed.

    Example:
        >>> sampler = Sampler(SamplingParams(seed=1), model.config.vocab_size)
        >>> sampler.observe(prompt_tokens)
        >>> token = sampler.sample(logits)
        >>> sampler.accept(token)
    """

    def __init__(self, params: SamplingParams, vocab_size: int, rng: Optional[np.random.Generator] = None):
        params.check_vocab(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.rng = rng if rng is not None else np.random.default_rng(params.seed)
        self.occurrence = np.zeros(vocab_size, np.float64)
        self.seen: list[int] = []           # distinct generated tokens, in order of appearance
        self._seen_ids = np.zeros(0, np.int64)
        self._seen_set: set[int] = set()
        self.in_context = np.zeros(vocab_size, bool)
        self.bias = None
        if params.logit_bias or params.banned_tokens:
            self.bias = np.zeros(vocab_size, np.float64)
            for t, b in params.logit_bias.items():
                self.bias[t] += b
            self.bias[list(params.banned_tokens)] = -np.inf

    def observe(self, tokens: Sequence[int]) -> None:
        """Tokens of the prompt: they count for the repetition penalty only."""
        self.in_context[np.asarray(tokens, np.int64)] = True

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """Steps 1-3: bias, bans, penalties, as a new float64 array."""
        p = self.params
        x = np.array(logits, np.float64).reshape(-1)
        if x.shape[0] != self.vocab_size:
            raise InvalidArgumentError(f"expected {self.vocab_size} logits, got {x.shape[0]}")
        if self.bias is not None:
            x += self.bias
        if len(self.seen) != self._seen_ids.shape[0]:
            self._seen_ids = np.array(self.seen, np.int64)
        apply_penalties(x, self._seen_ids, self.occurrence, p.presence_penalty, p.frequency_penalty)
        apply_repetition_penalty(x, self.in_context, p.repetition_penalty)
        return x

    def sample(self, logits: np.ndarray) -> int:
        """The next token for these logits (V,)."""
        p = self.params
        x = self.adjusted_logits(logits)
        if not np.isfinite(x.max()):
            raise self._no_token(logits)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        ids = kept_tokens(x, p.top_k, p.top_p, p.min_p)
        return draw(x, ids, p.temperature, self.rng)

    def _no_token(self, logits) -> Exception:
        """Why no logit is left finite, naming only what the caller set."""
        if not np.isfinite(np.asarray(logits, np.float64)).all():
            return NonFiniteError("no token can be generated: the model's logits are NaN or infinite")
        if self.bias is not None:
            return InvalidArgumentError("no token can be generated: every logit is -inf after the logit biases "
                                        "and banned tokens")
        return InvalidArgumentError("no token can be generated: every logit is -inf or NaN after the penalties")

    def accept(self, token: int) -> None:
        """Record a generated token: decay old occurrences, count this one."""
        self.occurrence *= self.params.penalty_decay
        if token not in self._seen_set:
            self._seen_set.add(token)
            self.seen.append(token)
        self.occurrence[token] += 1.0
        self.in_context[token] = True
