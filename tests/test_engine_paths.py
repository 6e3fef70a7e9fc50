"""The engine against the numpy references, at every dtype, and a prompt fed whole against
the same prompt fed one token at a time.

Random official-layout models of every generation are converted to canonical
tensors (tests/reference/official.py) and stored at fp32, fp16, int8 and int4;
the numpy reference runs on the very same (dequantized) weights.

Where our own kernels do every product (forced here with _BLAS_MIN_BYTES beyond any
matrix), a token's numbers do not depend on the tokens sharing its block: one at a
time, a whole prompt, or a prompt cut into blocks give the same bits. Where BLAS
takes part (fp32/fp16 matrices of 1 MB and more, forced with _BLAS_MIN_BYTES = 0)
the sums are rounded in another order: each path is within FLOAT_TOLERANCE of the
float64 reference, so the two are within twice that of each other.
"""

import numpy as np
import pytest

from reference import ACTIVATION_ROUNDING, FLOAT_TOLERANCE, logits_tolerance, official, reference_logits
from rwkvcpu import matrix as matrix_module
from rwkvcpu import model as model_module

GENERATIONS = ("v4", "v5.0", "v5.1", "v5.2", "v6", "v7")
DTYPES = ("fp32", "fp16", "int8", "int4")
N_TOKENS = 40


@pytest.fixture
def own_kernels(monkeypatch):
    """Every product on our kernels, whatever the matrix's size (no BLAS)."""
    monkeypatch.setattr(matrix_module, "_BLAS_MIN_BYTES", 1 << 62)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(generation, dtype) -> (Model, stored tensors, config, tokens)."""
    built = official.random_models(tmp_path_factory.mktemp("paths"), GENERATIONS, DTYPES, seed=30)
    tokens = {gen: np.random.default_rng(i).integers(0, 256, N_TOKENS) for i, gen in enumerate(GENERATIONS)}
    return {(gen, dtype): (*m, tokens[gen]) for (gen, dtype), m in built.items()}


def one_by_one(model, tokens, state=None):
    rows = []
    for t in tokens:
        logits, state = model.forward([int(t)], state)
        rows.append(logits)
    return np.array(rows), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_matches_numpy_reference(models, gen, dtype):
    model, stored, config, tokens = models[gen, dtype]
    ref = reference_logits(config, stored, tokens, round_activations=dtype in ACTIVATION_ROUNDING)
    tolerance = logits_tolerance(dtype)
    seq, _ = model.forward(tokens, all_logits=True)
    assert np.abs(seq - ref).max() <= tolerance
    one, _ = one_by_one(model, tokens)
    assert np.abs(one - ref).max() <= tolerance


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token_at_a_time_equals_the_whole_prompt(models, gen, dtype, own_kernels):
    """Bit-identical on our kernels (rwkvcpu/matrix.py: matmul)."""
    model, _, _, tokens = models[gen, dtype]
    one, s1 = one_by_one(model, tokens)
    seq, s2 = model.forward(tokens, all_logits=True)
    last, s3 = model.forward(tokens)
    np.testing.assert_array_equal(seq, one)
    np.testing.assert_array_equal(last, one[-1])
    np.testing.assert_array_equal(s1.data, s2.data)
    np.testing.assert_array_equal(s1.data, s3.data)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_prompt_blocks_and_continuation(models, gen, monkeypatch, own_kernels):
    """Prompts longer than one block, and a prompt split over two calls, give the same bits."""
    model, _, _, tokens = models[gen, "fp32"]
    whole, _ = model.forward(tokens, all_logits=True)
    monkeypatch.setattr(model_module, "PROMPT_BLOCK", 7)
    blocked, _ = model.forward(tokens, all_logits=True)
    np.testing.assert_array_equal(blocked, whole)
    _, state = model.forward(tokens[:13])
    rest, _ = model.forward(tokens[13:], state, all_logits=True)
    np.testing.assert_array_equal(rest, whole[13:])


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_blas_sequence_path(models, gen, dtype, monkeypatch):
    """fp32/fp16 matrices of 1 MB and more take BLAS for a block of tokens: the whole prompt is
    then within FLOAT_TOLERANCE of the reference, and within twice that of one token at a time."""
    monkeypatch.setattr(matrix_module, "_BLAS_MIN_BYTES", 0)
    model, stored, config, tokens = models[gen, dtype]
    seq, _ = model.forward(tokens, all_logits=True)
    assert np.abs(seq - reference_logits(config, stored, tokens)).max() <= FLOAT_TOLERANCE
    one, _ = one_by_one(model, tokens)
    assert np.abs(seq - one).max() <= 2 * FLOAT_TOLERANCE
