"""States through the engine: save/load and continue, refusal of foreign states, long runs."""

import numpy as np
import pytest

import rwkvcpu
from conftest import SHARED
from reference import official
from rwkvcpu.errors import StateMismatchError
from rwkvcpu.state import State


def _model(tmp_path, gen, seed=0, dtype="fp32", source_sha256=None):
    sd = official.random_official(gen, n_layer=2, n_embd=64, vocab_size=256, head_size=32, seed=seed)
    config, tensors = official.canonical_from_official(gen, sd)
    path = tmp_path / f"{gen}-{seed}-{dtype}.safetensors"
    official.write_model(path, config, tensors, dtype=dtype, source_sha256=source_sha256)
    return rwkvcpu.load(path)


@pytest.mark.parametrize("gen", ["v4", "v5.2", "v6", "v7"])
def test_save_load_and_continue(tmp_path, gen):
    model = _model(tmp_path, gen)
    _, state = model.forward([10, 20, 30])
    state.save(tmp_path / "s.state")
    loaded = State.load(tmp_path / "s.state", model)
    np.testing.assert_array_equal(loaded.data, state.data)
    a, _ = model.forward([40], state)
    b, _ = model.forward([40], loaded)
    np.testing.assert_array_equal(a, b)
    whole, _ = model.forward([10, 20, 30, 40])
    assert np.abs(whole - a).max() <= 1e-5


def test_state_of_another_model_is_refused(tmp_path):
    model = _model(tmp_path, "v7", seed=1)
    other = _model(tmp_path, "v7", seed=2)
    _, state = other.forward([1, 2])
    state.save(tmp_path / "other.state")
    with pytest.raises(StateMismatchError, match="different model"):
        State.load(tmp_path / "other.state", model)
    with pytest.raises(StateMismatchError, match="different model"):
        model.forward([3], state)


def test_state_is_shared_by_dtypes_of_one_checkpoint(tmp_path):
    fp32 = _model(tmp_path, "v6", dtype="fp32", source_sha256="ab" * 32)
    int8 = _model(tmp_path, "v6", dtype="int8", source_sha256="ab" * 32)
    assert fp32.fingerprint == int8.fingerprint
    _, state = int8.forward([1, 2, 3])
    logits, _ = fp32.forward([4], state)
    assert np.isfinite(logits).all()


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _long_run(model, tokens, step=10_000):
    state = model.initial_state()
    size = len(state)
    rss = []
    for t0 in range(0, len(tokens), step):
        logits, state = model.forward(tokens[t0:t0 + step], state)
        assert np.isfinite(logits).all(), f"non-finite logits after {t0 + step} tokens"
        assert np.isfinite(state.data).all(), f"non-finite state after {t0 + step} tokens"
        assert len(state) == size
        rss.append(_rss_mb())
    # a few one-token steps at the end too
    for t in tokens[:50]:
        logits, state = model.forward([int(t)], state)
        assert np.isfinite(logits).all()
    return rss


def _corpus_bytes(n):
    if SHARED is not None:
        raw = (SHARED / "corpus" / "dev.txt").read_bytes()[:n]
        if len(raw) == n:
            return np.frombuffer(raw, np.uint8).astype(np.int64)
    return np.random.default_rng(0).integers(0, 256, n)


@pytest.mark.parametrize("gen", ["v4", "v7"])
def test_100k_tokens_through_one_state(tmp_path, gen):
    """No NaN or Inf, the state keeps its size, and memory stays flat (RSS after 20k tokens vs after 100k)."""
    model = _model(tmp_path, gen)
    rss = _long_run(model, _corpus_bytes(100_000))
    assert rss[-1] - rss[1] < 16, f"RSS grew from {rss[1]:.1f} MB to {rss[-1]:.1f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["tiny-rwkv-4v0-660K", "tiny-rwkv-5v2-730K", "tiny-rwkv-6v0-1m",
                                  "tiny-rwkv-7v0-834K"])
def test_100k_tokens_tiny_fixture(stem):
    if SHARED is None:
        pytest.skip("../shared is not beside this checkout")
    model = rwkvcpu.load(SHARED / "fixtures" / "tiny-rwkv" / f"{stem}-FP32.bin", dtype="int8")
    rss = _long_run(model, _corpus_bytes(100_000))
    assert rss[-1] - rss[1] < 16, f"RSS grew from {rss[1]:.1f} MB to {rss[-1]:.1f} MB"
