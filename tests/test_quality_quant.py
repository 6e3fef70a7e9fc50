"""Regression bounds on what fp16, int8 and int4 weights do to the next-token distribution.

Per shared tiny fixture, over the first 1024 bytes of corpus/dev.txt: mean
KL(p_fp32 || p_dtype) and top-1 agreement with fp32, on the sequence path.
Bounds are the values measured when this test was written (python -m
reference.quality 1024, from tests/) with headroom: KL x3, top-1 minus a few
points. The 4096-byte table is in docs/MEASUREMENTS.md.
"""

import pytest

from conftest import SHARED, TINY_STEMS
from reference import quality

N_BYTES = 1024

# stem -> dtype -> (max mean KL in nats, min top-1 agreement)
BOUNDS = {
    "tiny-rwkv-4v0-660K": {"fp16": (5e-6, 0.995), "int8": (2e-4, 0.985), "int4": (3e-2, 0.87)},
    "tiny-rwkv-5v1-730K": {"fp16": (5e-6, 0.995), "int8": (2e-3, 0.96), "int4": (0.2, 0.80)},
    "tiny-rwkv-5v2-730K": {"fp16": (5e-6, 0.995), "int8": (1.5e-3, 0.96), "int4": (0.2, 0.79)},
    "tiny-rwkv-6v0-1m": {"fp16": (5e-6, 0.995), "int8": (4e-4, 0.985), "int4": (6e-2, 0.96)},
    "tiny-rwkv-7v0-834K": {"fp16": (5e-6, 0.995), "int8": (3e-5, 0.985), "int4": (4e-3, 0.95)},
}


@pytest.fixture(scope="module")
def measured():
    if SHARED is None:
        pytest.skip("../shared is not beside this checkout")
    tokens = quality.corpus_tokens(SHARED, N_BYTES)
    return {stem: quality.measure(SHARED / "fixtures" / "tiny-rwkv" / f"{stem}-FP32.bin", tokens)
            for stem in BOUNDS}


@pytest.mark.parametrize("stem", list(BOUNDS))
def test_quantization_quality(measured, stem):
    assert set(BOUNDS) == set(TINY_STEMS.values())
    res = measured[stem]
    for dtype, (max_kl, min_top1) in BOUNDS[stem].items():
        kl, top1 = res[dtype]
        assert kl <= max_kl, f"{stem} {dtype}: mean KL {kl:.3g} > {max_kl:.3g}"
        assert top1 >= min_top1, f"{stem} {dtype}: top-1 agreement {top1:.4f} < {min_top1}"
    # fewer bits, further from fp32
    assert res["fp16"][0] < res["int8"][0] < res["int4"][0]
