"""Several sequences through one step (Model.step / forward_batch) against each alone (Model.forward).

A step concatenates its sequences' tokens into one block: every matrix product is one call
over all of them, while token shift and the recurrences run per sequence on its own slot.
Our kernels compute each token's row of a product the same way whatever else is in the
block, so wherever they do the products (every int8/int4 matrix; fp32/fp16 matrices under
1 MB, which is every matrix of these small models) a sequence's logits and state in a
batch are bit-identical to its own. fp32/fp16 matrices of 1 MB and more take BLAS for
blocks of several tokens (forced below with _BLAS_MIN_BYTES = 0); BLAS sums in an order
that depends on the block, so there batched and alone are two float32 evaluations of the
same function: each is within FLOAT_TOLERANCE of the float64 reference, hence within twice
that of each other.
"""

import numpy as np
import pytest

import rwkvcpu
from reference import FLOAT_TOLERANCE, official, reference_logits
from rwkvcpu import InvalidArgumentError
from rwkvcpu import matrix as matrix_module
from rwkvcpu import model as model_module
from rwkvcpu.models import default_model_path

GENERATIONS = ("v4", "v5.0", "v5.1", "v5.2", "v6", "v7")
DTYPES = ("fp32", "fp16", "int8", "int4")


@pytest.fixture(scope="module")
def model():
    return rwkvcpu.load(default_model_path(), dtype="int8")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(generation, dtype) -> (Model, stored tensors, config): small random models of every generation."""
    return official.random_models(tmp_path_factory.mktemp("batch"), GENERATIONS, DTYPES, seed=50)


def _prompts(model, lengths, seed=5):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, model.config.vocab_size, n))) for n in lengths]


def _mixed_step(model, prompts):
    """Sequences 0 and 1 are prefilled first; then one step where they decode a token each while
    sequence 2 prefills its whole prompt and sequence 3 its first token. Returns that step's
    logits and pool, with the slots in batch order."""
    pool = model.state_pool(5)
    slots = [pool.acquire() for _ in range(4)]
    model.step(pool, [(slots[0], prompts[0]), (slots[1], prompts[1])])
    batch = [(slots[0], [7]), (slots[2], prompts[2]), (slots[1], [3]), (slots[3], prompts[3][:1])]
    return model.step(pool, batch), pool, [s for s, _ in batch]


def _alone(model, prompts):
    """What each sequence of _mixed_step gives alone: (logits, state) in batch order."""
    return [model.forward(toks) for toks in (prompts[0] + [7], prompts[2], prompts[1] + [3], prompts[3][:1])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_mixed_step_is_bit_identical_to_each_alone(models, gen, dtype):
    model = models[gen, dtype][0]
    prompts = _prompts(model, [5, 2, 23, 9], seed=len(gen) + len(dtype))
    logits, pool, slots = _mixed_step(model, prompts)
    for row, slot, (want, state) in zip(logits, slots, _alone(model, prompts)):
        np.testing.assert_array_equal(row, want)
        np.testing.assert_array_equal(pool.snapshot(slot).data, state.data)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_sequences_cut_across_blocks(models, gen, monkeypatch):
    """A step of more tokens than PROMPT_BLOCK runs block after block; a sequence that does not fit
    what is left of a block continues in the next one: the same bits as each alone."""
    model = models[gen, "int8"][0]
    prompts = _prompts(model, [9, 1, 14, 3], seed=2)
    monkeypatch.setattr(model_module, "PROMPT_BLOCK", 4)
    logits, states = model.forward_batch(prompts)
    monkeypatch.undo()
    for toks, row, state in zip(prompts, logits, states):
        want, want_state = model.forward(toks)
        np.testing.assert_array_equal(row, want)
        np.testing.assert_array_equal(state.data, want_state.data)


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_blas_step_within_float_rounding(models, gen, dtype, monkeypatch):
    """With BLAS for every fp32/fp16 product of several tokens, a sequence's logits in the mixed
    step are within FLOAT_TOLERANCE of the float64 reference, and within twice that of the
    sequence alone (see the module docstring)."""
    model, stored, config = models[gen, dtype]
    monkeypatch.setattr(matrix_module, "_BLAS_MIN_BYTES", 0)
    prompts = _prompts(model, [5, 2, 23, 9], seed=3)
    logits, _, _ = _mixed_step(model, prompts)
    fed = (prompts[0] + [7], prompts[2], prompts[1] + [3], prompts[3][:1])
    for row, toks, (want, _) in zip(logits, fed, _alone(model, prompts)):
        assert np.abs(row - reference_logits(config, stored, toks)[-1]).max() <= FLOAT_TOLERANCE
        assert np.abs(row - want).max() <= 2 * FLOAT_TOLERANCE


def test_forward_batch_equals_forward_alone(model):
    prompts = _prompts(model, [1, 3, 17, 300])
    logits, states = model.forward_batch(prompts)
    for toks, lg, st in zip(prompts, logits, states):
        alone, alone_state = model.forward(toks)
        np.testing.assert_array_equal(lg, alone)
        np.testing.assert_array_equal(st.data, alone_state.data)


def test_forward_batch_continues_given_states(model):
    prompts = _prompts(model, [4, 6], seed=8)
    _, first = model.forward(prompts[0])
    logits, states = model.forward_batch([[5, 6], prompts[1]], [first, None])
    want, want_state = model.forward([5, 6], first)
    np.testing.assert_array_equal(logits[0], want)
    np.testing.assert_array_equal(states[0].data, want_state.data)
    np.testing.assert_array_equal(logits[1], model.forward(prompts[1])[0])
    np.testing.assert_array_equal(first.data, model.forward(prompts[0])[1].data)   # not modified


def test_step_mixes_decode_and_prefill_in_place(model):
    prompts = _prompts(model, [5, 40], seed=6)
    pool = model.state_pool(3)
    a, b = pool.acquire(), pool.acquire()
    model.step(pool, [(a, prompts[0])])
    # a decodes one token while b prefills its whole prompt in the same step
    out = model.step(pool, [(a, [11]), (b, prompts[1])])
    want_a, state_a = model.forward(prompts[0] + [11])
    want_b, state_b = model.forward(prompts[1])
    np.testing.assert_array_equal(out[0], want_a)
    np.testing.assert_array_equal(out[1], want_b)
    np.testing.assert_array_equal(pool.snapshot(a).data, state_a.data)
    np.testing.assert_array_equal(pool.state(b).data, state_b.data)


def test_step_leaves_other_slots_alone(model):
    pool = model.state_pool(3)
    a, b, c = pool.acquire(), pool.acquire(), pool.acquire()
    model.step(pool, [(a, [1, 2]), (b, [3]), (c, [4, 5, 6])])
    before = pool.data.copy()
    model.step(pool, [(c, [9]), (a, [8])])
    np.testing.assert_array_equal(pool.data[b], before[b])
    assert not np.array_equal(pool.data[a], before[a]) and not np.array_equal(pool.data[c], before[c])


def test_pool_slots_and_bad_batches(model):
    pool = model.state_pool(2)
    a = pool.acquire()
    b = pool.acquire(model.forward([1, 2])[1])
    assert pool.free == 0
    with pytest.raises(InvalidArgumentError, match="in use"):
        pool.acquire()
    with pytest.raises(InvalidArgumentError, match="twice"):
        model.step(pool, [(a, [1]), (a, [2])])
    with pytest.raises(InvalidArgumentError, match="empty batch"):
        model.step(pool, [])
    before = pool.data.copy()
    with pytest.raises(InvalidArgumentError, match="outside this model's vocabulary"):
        model.step(pool, [(a, [1]), (b, [10**9])])
    np.testing.assert_array_equal(pool.data, before)
    pool.release(a)
    with pytest.raises(InvalidArgumentError, match="not in use"):
        model.step(pool, [(a, [1])])
    assert pool.acquire() == a


def test_a_one_layer_v7_steps(tmp_path):
    """One layer has no value residual (no v1/v2, so the converter records no Dv): its work
    buffer is empty and unused."""
    from checkpoints import random_official_state_dict, write_pth
    sd = random_official_state_dict("v7", 1, 64, 256, head_size=32, seed=4)
    # As llama.cpp's GGUF files: layer 0 without the value residual's (unused) tensors.
    sd = {k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
    path = write_pth(tmp_path / "one.pth", sd)
    model = rwkvcpu.load(path, dtype="int8")
    assert "Dv" not in model.config.lora_dims
    logits, _ = model.forward_batch([[1, 2, 3], [4]])
    np.testing.assert_array_equal(logits[0], model.forward([1, 2, 3])[0])
