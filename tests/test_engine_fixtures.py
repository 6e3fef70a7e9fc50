"""The shared tiny rwkv.cpp models against rwkv.cpp's own expected logits after the bytes '"in'.

Loaded straight from the .bin files (converted in memory). The FP32 files must
match within 1e-4, by both paths; 5v2 and 7v0 ship no expected logits and are
checked against the reference package in test_engine_golden.py.
"""

import numpy as np
import pytest

import rwkvcpu
from conftest import tiny_model_path

PROMPT = [34, 105, 110]  # '"in'
WITH_EXPECTED = {"v4": "4v0-660K", "v5.0": "5v1-730K", "v6": "6v0-1m"}


def _expected(shared, stem):
    return np.fromfile(shared / "fixtures" / "tiny-rwkv" / f"expected-logits-{stem}.bin", dtype="<f4")


@pytest.mark.parametrize("gen", list(WITH_EXPECTED))
def test_fp32_fixture_matches_expected_logits(shared_dir, gen):
    model = rwkvcpu.load(tiny_model_path(gen, "FP32"), dtype="fp32")
    expected = _expected(shared_dir, WITH_EXPECTED[gen])
    assert model.config.generation == gen and model.config.vocab_size == expected.size
    seq, _ = model.forward(PROMPT)
    state = None
    for t in PROMPT:
        one, state = model.forward([t], state)
    assert np.abs(seq - expected).max() <= 1e-4
    assert np.abs(one - expected).max() <= 1e-4


@pytest.mark.parametrize("gen", list(WITH_EXPECTED))
def test_fp16_fixture_is_close(shared_dir, gen):
    model = rwkvcpu.load(tiny_model_path(gen, "FP16"), dtype="fp16")
    logits, _ = model.forward(PROMPT)
    expected = _expected(shared_dir, WITH_EXPECTED[gen])
    # fp16 weights: measured max differences 4e-4 .. 6e-3 on these logits
    assert np.abs(logits - expected).max() <= 2e-2
    assert logits.argmax() == expected.argmax()
