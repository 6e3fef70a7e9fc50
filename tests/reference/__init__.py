"""Numpy references of every RWKV generation, and the tools to compare against
the official `rwkv` package (tests only; never imported by rwkvcpu).

    REFERENCES[family].forward(config, W, tokens) -> (logits (T, V) float64, state)

W is name -> float64 array of the canonical tensors (docs/FORMAT.md), e.g.
from common.dense_weights(config, stored_tensors).
"""

from . import v4, v5, v6, v7
from .common import dense_weights

REFERENCES = {"v4": v4, "v5": v5, "v6": v6, "v7": v7}

# How far the engine's float32 logits may be from the float64 reference on the small
# random test models (logits of magnitude ~10): float32 rounding accumulated over the
# layers; measured up to ~2e-5 with our kernels or BLAS, whichever sums the products.
FLOAT_TOLERANCE = 1e-4
# int8/int4 kernels round the activations to int16 per weight group (rwkvcpu/kernels/matmul.py).
# A rounding step is max|x over the group| / 32767, so float differences of ~1e-6 between the
# engine and the reference flip some roundings and the logits differ by more than float
# rounding alone would make them. Measured on these models: up to 1.2e-3 (v7 int4);
# emulating the rounding in the reference does not bring it closer (the flips remain).
ACTIVATION_ROUNDING = {"int8": 5e-3, "int4": 5e-3}


def logits_tolerance(dtype: str) -> float:
    """The bound of |engine - reference| on the test models' logits for a storage dtype."""
    return ACTIVATION_ROUNDING.get(dtype, FLOAT_TOLERANCE)


def reference_logits(config, stored, tokens):
    """Logits after each token (T, V), computed by the numpy reference from stored tensors."""
    W = dense_weights(config, stored)
    logits, _ = REFERENCES[config.family].forward(config, W, tokens)
    return logits
