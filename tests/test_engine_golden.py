"""fp32 engine vs logits of the reference `rwkv` package stored in tests/golden (no torch needed).

Every generation, 64 tokens, fed one by one and as one sequence: max |logit
difference| <= 1e-4. Regenerate the files with tests/make_engine_golden.py.
"""

import numpy as np
import pytest

import rwkvcpu
from conftest import SHARED
from reference import golden, official

TOL = 1e-4


def _run_both(model, tokens):
    """(logits after each token fed one by one (T, V), logits after each token of one sequence (T, V))."""
    state, one = None, []
    for t in tokens:
        logits, state = model.forward([int(t)], state)
        one.append(logits)
    seq, _ = model.forward(tokens, all_logits=True)
    return np.array(one), seq


def _check(model, gold):
    tokens, pos = gold["tokens"], gold["positions"]
    one, seq = _run_both(model, tokens)
    last, _ = model.forward(tokens)
    assert np.abs(one[pos] - gold["one"]).max() <= TOL
    assert np.abs(seq[pos] - gold["one"]).max() <= TOL
    assert np.abs(last - gold["seq"]).max() <= TOL


@pytest.mark.parametrize("name", list(golden.RANDOM_CASES))
def test_random_model_matches_reference_package(name, tmp_path):
    gold = np.load(golden.golden_path(name))
    generation, sd, tokens = golden.random_case(name)
    config, tensors = official.canonical_from_official(generation, sd)
    assert golden.checksum(tensors) == pytest.approx(float(gold["checksum"]), rel=1e-9), (
        "the random model generator changed; re-run tests/make_engine_golden.py")
    np.testing.assert_array_equal(tokens, gold["tokens"])
    model = rwkvcpu.load(official.write_model(tmp_path / "m.safetensors", config, tensors))
    _check(model, gold)


@pytest.mark.parametrize("name", list(golden.TINY_CASES))
def test_tiny_fixture_matches_reference_package(name):
    if SHARED is None:
        pytest.skip("../shared is not beside this checkout")
    gold = np.load(golden.golden_path(name))
    path = SHARED / "fixtures" / "tiny-rwkv" / f"{golden.TINY_CASES[name]}-FP32.bin"
    # The reference package hard-codes the official group-norm epsilon.
    model = rwkvcpu.load(path, dtype="fp32", group_norm_eps=64e-5)
    _check(model, gold)
