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
# int8/int4 kernels round the activations to int8 per weight group (rwkvcpu/kernels/qmatmul.py);
# compared with a reference that rounds them the same way (reference_logits(round_activations=
# True)), a float difference of ~1e-7 between the two can still put one activation on either
# side of a rounding boundary (a step of max|x over its group| / 127). Measured on these models:
# int8 within 2e-6 everywhere; int4 within 2e-6 but where one such flip moves the logits of the
# tokens after it by up to 5.5e-2 (v5.1, v5.2, v7).
ACTIVATION_ROUNDING = {"int8": 1e-4, "int4": 0.1}


def logits_tolerance(dtype: str) -> float:
    """The bound of |engine - reference| on the test models' logits for a storage dtype."""
    return ACTIVATION_ROUNDING.get(dtype, FLOAT_TOLERANCE)


def reference_logits(config, stored, tokens, round_activations=False):
    """Logits after each token (T, V), computed by the numpy reference from stored tensors
    (with round_activations: int8/int4 products round their input as the engine does,
    see common.RoundedInputs)."""
    W = dense_weights(config, stored, round_activations)
    logits, _ = REFERENCES[config.family].forward(config, W, tokens)
    return logits
