"""The engine against the numpy references, at every dtype, and its two paths against each other.

Random official-layout models of every generation are converted to canonical
tensors (tests/reference/official.py) and stored at fp32, fp16, int8 and int4;
the numpy reference runs on the very same (dequantized) weights.
"""

import numpy as np
import pytest

import rwkvcpu
from reference import official, reference_logits
from rwkvcpu import model as model_module

GENERATIONS = ("v4", "v5.0", "v5.1", "v5.2", "v6", "v7")
DTYPES = ("fp32", "fp16", "int8", "int4")
N_TOKENS = 40

# The int8/int4 kernels round the activations to int16 per weight group
# (rwkvcpu/kernels/matmul.py), on both paths; the reference multiplies by the
# dequantized weights in float64. A rounding step is max|x over the group| / 32767,
# so float differences of ~1e-6 between the two flip some roundings and the logits
# differ by more than float rounding alone would make them. Measured on these
# models: up to 1.2e-3 (v7 int4) on either path; emulating the rounding in the
# reference does not bring it closer (the flips remain).
ACTIVATION_ROUNDING = {"int8": 5e-3, "int4": 5e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(generation, dtype) -> (Model, stored tensors, config, tokens)."""
    from safetensors.numpy import load_file
    root = tmp_path_factory.mktemp("paths")
    out = {}
    for i, gen in enumerate(GENERATIONS):
        sd = official.random_official(gen, n_layer=2, n_embd=128, vocab_size=256, head_size=64, seed=30 + i)
        config, tensors = official.canonical_from_official(gen, sd)
        tokens = np.random.default_rng(i).integers(0, 256, N_TOKENS)
        for dtype in DTYPES:
            path = official.write_model(root / f"{gen}-{dtype}.safetensors", config, tensors, dtype=dtype)
            out[gen, dtype] = (rwkvcpu.load(path), load_file(str(path)), config, tokens)
    return out


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
    ref = reference_logits(config, stored, tokens)
    tolerance = ACTIVATION_ROUNDING.get(dtype, 1e-4)
    seq, _ = model.forward(tokens, all_logits=True)
    assert np.abs(seq - ref).max() <= tolerance
    one, _ = one_by_one(model, tokens)
    assert np.abs(one - ref).max() <= tolerance


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token_path_equals_sequence_path(models, gen, dtype):
    """Within 1e-5 (issue 3). These models' matrices are all under 1 MB, so both paths run the
    same kernels (rwkvcpu/matrix.py: matmul) and agree to the bit; larger fp32/fp16 matrices take
    BLAS on the sequence path and differ by float32 rounding (test_blas_sequence_path)."""
    model, _, _, tokens = models[gen, dtype]
    one, s1 = one_by_one(model, tokens)
    seq, s2 = model.forward(tokens, all_logits=True)
    last, s3 = model.forward(tokens)
    assert np.abs(seq - one).max() <= 1e-5
    assert np.abs(last - one[-1]).max() <= 1e-5
    assert np.abs(s1.data - s2.data).max() <= 1e-5
    assert np.abs(s1.data - s3.data).max() <= 1e-5


@pytest.mark.parametrize("gen", GENERATIONS)
def test_prompt_blocks_and_continuation(models, gen, monkeypatch):
    """Prompts longer than one block, and a prompt split over two calls, give the same numbers."""
    model, _, _, tokens = models[gen, "fp32"]
    whole, _ = model.forward(tokens, all_logits=True)
    monkeypatch.setattr(model_module, "PROMPT_BLOCK", 7)
    blocked, _ = model.forward(tokens, all_logits=True)
    assert np.abs(blocked - whole).max() <= 1e-5
    _, state = model.forward(tokens[:13])
    rest, _ = model.forward(tokens[13:], state, all_logits=True)
    assert np.abs(rest - whole[13:]).max() <= 1e-5


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_blas_sequence_path(models, gen, dtype, monkeypatch):
    """fp32/fp16 matrices of 1 MB and more take BLAS for a block of tokens: still within 1e-5."""
    from rwkvcpu import matrix
    monkeypatch.setattr(matrix, "_BLAS_MIN_BYTES", 0)
    model, _, _, tokens = models[gen, dtype]
    one, _ = one_by_one(model, tokens)
    seq, _ = model.forward(tokens, all_logits=True)
    assert np.abs(seq - one).max() <= 1e-5
