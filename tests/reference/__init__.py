"""Numpy references of every RWKV generation, and the tools to compare against
the official `rwkv` package (tests only; never imported by rwkvcpu).

    REFERENCES[family].forward(config, W, tokens) -> (logits (T, V) float64, state)

W is name -> float64 array of the canonical tensors (docs/FORMAT.md), e.g.
from common.dense_weights(config, stored_tensors).
"""

from . import v4, v5, v6, v7
from .common import dense_weights

REFERENCES = {"v4": v4, "v5": v5, "v6": v6, "v7": v7}


def reference_logits(config, stored, tokens):
    """Logits after each token (T, V), computed by the numpy reference from stored tensors."""
    W = dense_weights(config, stored)
    logits, _ = REFERENCES[config.family].forward(config, W, tokens)
    return logits
