"""Quantized storage of real (trained) matrices: error bounds and stored shapes."""

import numpy as np
import pytest

from conftest import TINY_STEMS, tiny_model_path
from rwkvcpu.config import ModelConfig
from rwkvcpu.layouts import MATRIX, expected_tensors
from rwkvcpu import formats
from rwkvcpu.quant.convert import read_checkpoint

# Relative RMS error bounds. int8 rounds to a step of max/127 per 64 weights,
# error step/sqrt(12): 0.6 % of the RMS for Gaussian groups (max/RMS ~ 2.4), and
# 1.4 % for 4v0, whose groups have max/RMS ~ 6 (outlier channels). int4 has 16
# levels per 32 weights, fitted by least squares: ~7 % (worst 4v0 matrix ~10 %).
# fp16: 11 bits.
BOUNDS = {"fp16": 0.001, "int8": 0.02, "int4": 0.12}


@pytest.mark.parametrize("gen", sorted(TINY_STEMS))
def test_quantization_error_on_trained_matrices(gen):
    meta, t = read_checkpoint(tiny_model_path(gen, "FP32"), dtype="fp32")
    config = ModelConfig.from_metadata(meta)
    matrices = [n for n, (_, kind, _) in expected_tensors(config, False).items() if kind == MATRIX]
    for dtype, bound in BOUNDS.items():
        for name in matrices:
            w = t[name]
            if np.abs(w).max() < 1e-5:
                # 4v0's channel mix was never trained: ~1e-7 values, below fp16's scale range.
                continue
            fmt = formats.get_format(formats.format_for_matrix(dtype, w.shape))
            parts = fmt.quantize(w)
            assert {k: (v.dtype.str, v.shape) for k, v in parts.items()} == {
                k: (np.dtype(formats_np(d)).str, s) for k, (d, s) in fmt.parts(w.shape).items()}
            err = fmt.dequantize(parts) - w
            rel = np.sqrt(np.mean(err.astype(np.float64) ** 2) / np.mean(w.astype(np.float64) ** 2))
            assert rel < bound, (gen, dtype, name, rel)


def formats_np(st_dtype):
    return {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}[st_dtype]


def test_int8_per_weight_error_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(64, 256)).astype(np.float32)   # heavy tails, like real weights
    q8 = formats.Int8.quantize(w)
    step8 = np.repeat(q8[".scale"].astype(np.float32), 64, axis=1)
    assert np.all(np.abs(formats.Int8.dequantize(q8) - w) <= step8 / 2 * (1 + 1e-3) + 1e-7)


def test_int4_fit_never_worse_than_the_min_max_grid():
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(96, 128)).astype(np.float32)
    got = formats.Int4.dequantize(formats.Int4.quantize(w)).reshape(96, -1, 32)
    # The plain grid: levels from the group's min to its max (fp16 scale and min).
    blk = w.reshape(96, -1, 32)
    m = blk.min(axis=2).astype(np.float16).astype(np.float32)
    s = ((blk.max(axis=2) - m) / 15).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((blk - m[..., None]) / s[..., None]), 0, 15)
    plain = q * s[..., None] + m[..., None]
    err_got = np.square(got - blk).sum(axis=2)
    err_plain = np.square(plain - blk).sum(axis=2)
    assert np.all(err_got <= err_plain * (1 + 1e-5) + 1e-12)
    # On heavy-tailed groups the least-squares refit lowers the error clearly.
    assert err_got.sum() < 0.95 * err_plain.sum()
