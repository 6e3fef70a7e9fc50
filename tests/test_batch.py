"""Several sequences through one step (Model.step / forward_batch) against each alone (Model.forward)."""

import numpy as np
import pytest

import rwkvcpu
from rwkvcpu import InvalidArgumentError
from rwkvcpu.models import default_model_path


@pytest.fixture(scope="module")
def model():
    return rwkvcpu.load(default_model_path(), dtype="int8")


def _prompts(model, lengths, seed=5):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, model.config.vocab_size, n))) for n in lengths]


def test_forward_batch_equals_forward_alone(model):
    prompts = _prompts(model, [1, 3, 17, 300])
    logits, states = model.forward_batch(prompts)
    for toks, lg, st in zip(prompts, logits, states):
        alone, alone_state = model.forward(toks)
        np.testing.assert_array_equal(lg, alone)
        np.testing.assert_array_equal(st.data, alone_state.data)


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
