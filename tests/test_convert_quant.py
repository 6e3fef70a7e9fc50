"""Quantized storage of real (trained) matrices: error bounds and stored shapes."""

import numpy as np
import pytest

from conftest import TINY_STEMS, tiny_model_path
from rwkvcpu.config import ModelConfig
from rwkvcpu.layouts import MATRIX, expected_tensors
from rwkvcpu.quant import formats
from rwkvcpu.quant.convert import read_checkpoint

# Relative RMS error bounds. int8 rounds to a step of max/127 per 64 weights,
# error step/sqrt(12): 0.6 % of the RMS for Gaussian groups (max/RMS ~ 2.4), and
# 1.4 % for 4v0, whose groups have max/RMS ~ 6 (outlier channels). int4 rounds to
# (max-min)/15 per 32 weights: ~8 %, 4v0 ~13 %. fp16: 11 bits.
BOUNDS = {"fp16": 0.001, "int8": 0.02, "int4": 0.15}


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


def test_per_weight_error_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(64, 256)).astype(np.float32)   # heavy tails, like real weights
    q8 = formats.Int8.quantize(w)
    step8 = np.repeat(q8[".scale"].astype(np.float32), 64, axis=1)
    assert np.all(np.abs(formats.Int8.dequantize(q8) - w) <= step8 / 2 * (1 + 1e-3) + 1e-7)
    q4 = formats.Int4.quantize(w)
    step4 = np.repeat(q4[".scale"].astype(np.float32), 32, axis=1)
    # min and scale are fp16-rounded, so the grid may end up to one fp16 ulp short of the max.
    assert np.all(np.abs(formats.Int4.dequantize(q4) - w) <= step4 / 2 + np.abs(w) * 2 ** -10 + 1e-6)
