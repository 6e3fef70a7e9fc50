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


# ------------------------------------------------------------ state files on disk

def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_save_to_a_missing_directory_says_so(tmp_path):
    from rwkvcpu.errors import RwkvCpuError
    _, state = _model(tmp_path, "v7").forward([1, 2])
    dst = tmp_path / "nodir" / "x.state"
    with pytest.raises(RwkvCpuError) as e:
        state.save(dst)
    assert str(e.value) == f"{dst}: cannot save the state: no such directory {tmp_path / 'nodir'}"
    assert isinstance(e.value, OSError)


def test_save_onto_a_directory_says_so_and_leaves_nothing(tmp_path):
    from rwkvcpu.errors import RwkvCpuError
    _, state = _model(tmp_path, "v7").forward([1, 2])
    (tmp_path / "d").mkdir()
    with pytest.raises(RwkvCpuError) as e:
        state.save(tmp_path / "d")
    assert str(e.value) == f"{tmp_path / 'd'}: cannot save the state: is a directory"
    assert _no_temporaries(tmp_path) and list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("failure, reason", [
    (PermissionError(13, "Permission denied"), "permission denied"),
    (OSError(28, "No space left on device"), "no space left on the device"),
])
def test_save_failures_are_ours_and_leave_no_temporary(tmp_path, monkeypatch, failure, reason):
    """A full disk (or a write refused) midway: our error, and the temporary file removed.
    Simulated at os.write, since the tests may run as root and on a roomy disk."""
    import os
    from rwkvcpu.errors import RwkvCpuError
    _, state = _model(tmp_path, "v7").forward([1, 2])
    folder = tmp_path / "out"
    folder.mkdir()

    def failing_write(fd, data):
        raise failure
    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(RwkvCpuError, match=f"^{folder / 's.state'}: cannot save the state: {reason}$"):
        state.save(folder / "s.state")
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into a read-only folder")
def test_save_into_a_read_only_folder_says_permission_denied(tmp_path):
    from rwkvcpu.errors import RwkvCpuError
    _, state = _model(tmp_path, "v7").forward([1, 2])
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(RwkvCpuError, match="cannot save the state: permission denied$"):
            state.save(folder / "s.state")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_state_has_the_permissions_of_a_new_file(tmp_path, umask):
    """0666 less the umask, like any file a program creates (not a temporary file's 0600)."""
    import os
    _, state = _model(tmp_path, "v7").forward([1, 2])
    old = os.umask(umask)
    try:
        state.save(tmp_path / "s.state")
    finally:
        os.umask(old)
    assert (tmp_path / "s.state").stat().st_mode & 0o777 == 0o666 & ~umask
    assert _no_temporaries(tmp_path)


def test_load_of_a_directory_says_it_is_a_directory(tmp_path):
    model = _model(tmp_path, "v7")
    with pytest.raises(StateMismatchError) as e:
        State.load(tmp_path, model)
    assert str(e.value) == f"{tmp_path}: is a directory, not a state file"
