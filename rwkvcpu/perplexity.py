"""Perplexity and bits per byte of a model on a text.

The text runs through the model once, in chunks that carry the state
forward (``forward(chunk, state, all_logits=True)``), so memory stays at one
chunk's logits however long the text. Each token is scored by the logits of
the position before it. For tokenizers with an end-of-text token (World: 0),
that token is fed first, as a document boundary, so the first token of the
text is scored too; otherwise scoring starts at the second token.

Bits per byte divides the total negative log-likelihood (in bits) by the
UTF-8 bytes of the scored tokens: unlike perplexity it compares models with
different tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np

from .errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Attributes: tokens scored, nll (total negative log-likelihood in nats), bytes scored."""

    tokens: int
    nll: float
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_token(self) -> float:
        return self.nll / self.tokens / math.log(2)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes


def target_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[t])[targets[t]] for each row t.

    Args:
        logits: (T, V) float32.
        targets: (T,) int.

    Returns:
        (T,) float64 log-probabilities.
    """
    rows = np.arange(targets.shape[0])
    peak = logits.max(axis=1)
    total = np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)
    return (logits[rows, targets].astype(np.float64) - peak) - np.log(total)


def perplexity(model, text: str, *, chunk_size: int = 256, max_tokens: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> PerplexityResult:
    """Score a text with a model.

    Args:
        model: a loaded Model.
        text: the text to score.
        chunk_size: tokens per forward call (memory: chunk_size x vocabulary floats).
        max_tokens: score at most this many tokens (from the start).
        progress: called as progress(tokens scored, tokens to score) after each chunk.

    Returns:
        PerplexityResult with perplexity, bits_per_byte, bits_per_token.

    Raises:
        InvalidArgumentError: the text has fewer than two tokens to work with,
            or a bad chunk_size / max_tokens.

    Example:
        >>> r = perplexity(model, open("dev.txt").read(), max_tokens=10000)
        >>> print(f"{r.perplexity:.2f} {r.bits_per_byte:.3f}")
    """
    from .generate import model_tokenizer
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidArgumentError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    tokenizer = model_tokenizer(model)
    tokens = tokenizer.encode(text)
    eos = tokenizer.eos_token_id
    seq = ([eos] if eos is not None else []) + tokens
    if max_tokens is not None:
        seq = seq[:max_tokens + 1]
    if len(seq) < 2:
        raise InvalidArgumentError("the text is too short to score: it needs at least two tokens")
    seq = np.asarray(seq, np.int64)
    total = len(seq) - 1
    nll, n_bytes, state = 0.0, 0, None
    for start in range(0, total, chunk_size):
        inputs = seq[start:min(start + chunk_size, total)]
        targets = seq[start + 1:start + 1 + len(inputs)]
        logits, state = model.forward(inputs.tolist(), state, all_logits=True)
        logits = np.asarray(logits, np.float32).reshape(len(inputs), -1)
        nll -= float(target_log_probs(logits, targets).sum())
        n_bytes += len(tokenizer.decode_bytes(targets.tolist()))
        if progress is not None:
            progress(start + len(inputs), total)
    return PerplexityResult(tokens=total, nll=nll, bytes=max(n_bytes, 1))
