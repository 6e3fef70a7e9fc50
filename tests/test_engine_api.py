"""The engine's API contract: load, forward, initial_state, info, bad input, bad files."""

import json
import mmap
import struct

import numpy as np
import pytest

import rwkvcpu
from reference import official
from rwkvcpu.errors import InvalidArgumentError, ModelFormatError, StateMismatchError
from rwkvcpu.generations import common
from rwkvcpu.state import State, model_fingerprint, state_size


def _make(tmp_path, gen="v7", dtype="fp32", seed=0, name=None, **kw):
    sd = official.random_official(gen, n_layer=2, n_embd=64, vocab_size=256, head_size=32, seed=seed, **kw)
    config, tensors = official.canonical_from_official(gen, sd)
    path = tmp_path / (name or f"{gen}-{dtype}-{seed}.safetensors")
    official.write_model(path, config, tensors, dtype=dtype)
    return path, config, tensors


@pytest.fixture(scope="module")
def v7(tmp_path_factory):
    path, _, _ = _make(tmp_path_factory.mktemp("api"))
    return rwkvcpu.load(path)


def test_forward_returns_float32_logits_and_a_new_state(v7):
    s0 = v7.initial_state()
    before = s0.data.copy()
    logits, s1 = v7.forward([1, 2, 3], s0)
    assert logits.dtype == np.float32 and logits.shape == (256,)
    assert isinstance(s1, State) and s1 is not s0
    np.testing.assert_array_equal(s0.data, before)
    assert not np.array_equal(s1.data, before)
    # the same call again gives the same answer (no hidden state in the model)
    again, _ = v7.forward([1, 2, 3], s0)
    np.testing.assert_array_equal(logits, again)
    # default state is the initial state
    fresh, _ = v7.forward([1, 2, 3])
    np.testing.assert_array_equal(logits, fresh)


def test_all_logits(v7):
    rows, _ = v7.forward([5, 6, 7, 8], all_logits=True)
    assert rows.shape == (4, 256) and rows.dtype == np.float32
    last, _ = v7.forward([5, 6, 7, 8])
    # The same block either way; only the head's rows differ, each computed alone by our kernels.
    np.testing.assert_array_equal(rows[-1], last)


def test_state_size_is_constant(v7):
    state = v7.initial_state()
    n = len(state)
    assert n == state_size(v7.config) == state.data.size
    for _ in range(3):
        _, state = v7.forward(list(range(200)), state)
        assert len(state) == n and state.data.dtype == np.float32


def test_initial_state(tmp_path):
    m = rwkvcpu.load(_make(tmp_path, "v4")[0])
    s = m.initial_state()
    assert np.all(s.att_pp == -1e38) and not s.att_aa.any() and not s.att_x.any()
    s.data[:] = 1.0
    assert not m.initial_state().att_x.any(), "changing a state must not change the model"

    path, config, tensors = _make(tmp_path, "v6", time_state=True)
    m = rwkvcpu.load(path)
    s = m.initial_state()
    for i in range(config.n_layer):
        np.testing.assert_array_equal(s.wkv[i], tensors[f"blocks.{i}.att.time_state"])
    assert not s.att_x.any() and not s.ffn_x.any()


def test_info_and_fingerprint(v7):
    info = v7.info
    for key, value in {"generation": "v7", "n_layer": 2, "n_embd": 64, "vocab_size": 256,
                       "head_size": 32, "n_head": 2, "dtype": "fp32", "tokenizer": "bytes"}.items():
        assert info[key] == value, key
    assert v7.config.generation == "v7" and v7.metadata["format"] == "rwkvcpu"
    assert v7.fingerprint == model_fingerprint(v7.config, v7.metadata["source_sha256"])
    json.dumps(info)


def test_weights_are_memory_mapped(v7):
    def backed_by_mmap(a):
        while a is not None:
            if isinstance(a, mmap.mmap):
                return True
            a = getattr(a, "base", None) if not isinstance(a, memoryview) else a.obj
        return False
    w = v7._weights
    assert backed_by_mmap(w.head.w) and backed_by_mmap(w.emb.w)
    assert backed_by_mmap(w.blocks[1].att.key.w)
    assert not w.head.w.flags.writeable


def test_dtype_requantizes_in_memory(tmp_path):
    path, _, _ = _make(tmp_path, "v5.2")
    fp32 = rwkvcpu.load(path)
    int8 = rwkvcpu.load(path, dtype="int8")
    assert int8.info["dtype"] == "int8" and int8.info["matrix_formats"] == ["int8"]
    assert int8.fingerprint == fp32.fingerprint
    a, _ = fp32.forward([1, 2, 3])
    b, _ = int8.forward([1, 2, 3])
    # The same numbers as a file converted to int8 from the same weights...
    stored, _, _ = _make(tmp_path, "v5.2", dtype="int8")
    np.testing.assert_array_equal(b, rwkvcpu.load(stored).forward([1, 2, 3])[0])
    # ...and close to fp32: int8 rounds the weights and, in the products, the activations
    # (each by half a step of max|group| / 127); 0.11 measured on this random model.
    assert 0 < np.abs(a - b).max() < 0.3
    with pytest.raises(ModelFormatError, match="int3"):
        rwkvcpu.load(path, dtype="int3")


def test_threads(tmp_path):
    import numba
    m = rwkvcpu.load(_make(tmp_path, "v4")[0], threads=1)
    assert m.threads == 1
    m.forward([1])
    assert numba.get_num_threads() == 1
    from rwkvcpu.threads import SMALL_MODEL_BYTES, for_model
    # By default a model this small computes on one thread; a large one on every physical core.
    assert rwkvcpu.load(_make(tmp_path, "v4")[0]).threads == 1
    assert rwkvcpu.load(_make(tmp_path, "v4")[0], threads=2).threads == min(2, numba.config.NUMBA_NUM_THREADS)
    assert for_model(None, SMALL_MODEL_BYTES) is None and for_model(None, SMALL_MODEL_BYTES - 1) == 1
    assert for_model(3, 1) == 3
    for bad in (0, -2, 1.5, "2"):
        with pytest.raises(ValueError, match="threads"):
            rwkvcpu.load(_make(tmp_path, "v4")[0], threads=bad)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def no_kernels(monkeypatch):
    """Fail loudly if the engine starts computing."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the input was checked")
    monkeypatch.setattr(common, "forward", boom)


@pytest.mark.parametrize("tokens, match", [
    ([], "at least one token"),
    ([1, 256], r"token id 256 at position 1 .* \[0, 255\]"),
    ([-1], r"token id -1 at position 0 .* \[0, 255\]"),
    ([1.0, 2.0], "integers"),
    ([True], "integers"),
    ("hello", "not text"),
    (7, r"pass \[7\]$"),
    (np.int64(7), r"pass \[7\]$"),
    (None, r"^tokens must be a sequence of integer token ids, e\.g\. \[510, 1563\], got None$"),
    (3.5, r"^tokens must be a sequence of integer token ids, e\.g\. \[510, 1563\], got 3\.5$"),
    ([[1, 2]], "flat sequence"),
    ([1, None], "integers"),
    ([2**70], "integer"),
])
def test_bad_tokens(v7, no_kernels, tokens, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        v7.forward(tokens)
    assert isinstance(e.value, ValueError)


def test_numpy_token_arrays_are_accepted(v7):
    a, _ = v7.forward(np.array([1, 2, 3], dtype=np.uint8))
    b, _ = v7.forward([1, 2, 3])
    np.testing.assert_array_equal(a, b)


def test_bad_states(v7, tmp_path, no_kernels):
    good = v7.initial_state()
    with pytest.raises(StateMismatchError, match="initial_state"):
        v7.forward([1], good.data)
    with pytest.raises(StateMismatchError, match="initial_state"):
        v7.forward([1], [0.0] * len(good))
    other = rwkvcpu.load(_make(tmp_path, "v7", seed=5)[0])
    with pytest.raises(StateMismatchError, match="different model"):
        v7.forward([1], other.initial_state())
    v4 = rwkvcpu.load(_make(tmp_path, "v4")[0])
    with pytest.raises(StateMismatchError, match=r"float32 \(%d,\)" % len(good)):
        v7.forward([1], v4.initial_state())
    broken = good.copy()
    broken.data = broken.data[:-1]
    with pytest.raises(StateMismatchError):
        v7.forward([1], broken)
    assert isinstance(StateMismatchError("x"), ValueError)


# ---------------------------------------------------------------- bad files


def _rewrite(path, out, edit):
    """Copy a safetensors file, letting `edit(header, data)` change it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    header, data = edit(header, data)
    blob = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return out


def test_missing_tensor_is_named(tmp_path):
    path, _, _ = _make(tmp_path)

    def drop(h, d):
        del h["blocks.1.att.k_k"]
        return h, d
    bad = _rewrite(path, tmp_path / "bad.safetensors", drop)
    with pytest.raises(ModelFormatError, match=r"bad.safetensors.*'blocks.1.att.k_k' \[64\] is missing"):
        rwkvcpu.load(bad)


def test_misshapen_tensor_is_named(tmp_path):
    path, _, _ = _make(tmp_path)

    def reshape(h, d):
        h["blocks.0.att.key.weight"]["shape"] = [32, 128]
        return h, d
    bad = _rewrite(path, tmp_path / "bad.safetensors", reshape)
    with pytest.raises(ModelFormatError, match=r"'blocks.0.att.key.weight'.*\[32, 128\].*\[64, 64\]"):
        rwkvcpu.load(bad)


def test_metadata_that_disagrees_with_tensors(tmp_path):
    path, _, _ = _make(tmp_path)

    def relabel(h, d):
        h["__metadata__"]["n_layer"] = "3"
        return h, d
    with pytest.raises(ModelFormatError, match="blocks.2"):
        rwkvcpu.load(_rewrite(path, tmp_path / "bad.safetensors", relabel))

    def extra(h, d):
        h["__metadata__"]["n_layer"] = "1"
        return h, d
    with pytest.raises(ModelFormatError, match="unexpected tensors"):
        rwkvcpu.load(_rewrite(path, tmp_path / "bad2.safetensors", extra))


def test_truncated_file(tmp_path):
    path, _, _ = _make(tmp_path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:len(raw) - 1000])
    with pytest.raises(ModelFormatError, match="cut.safetensors.*truncated"):
        rwkvcpu.load(tmp_path / "cut.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        rwkvcpu.load(tmp_path / "nope.safetensors")


def test_wrong_format_version(tmp_path):
    path, _, _ = _make(tmp_path)

    def bump(h, d):
        h["__metadata__"]["format_version"] = "99"
        return h, d
    with pytest.raises(ModelFormatError, match="version"):
        rwkvcpu.load(_rewrite(path, tmp_path / "v99.safetensors", bump))


def test_folder_holding_one_model_file(tmp_path):
    """A folder whose only .safetensors is an rwkvcpu file loads that file (mapped, not converted)."""
    folder = tmp_path / "model"
    folder.mkdir()
    path, _, _ = _make(folder)
    (folder / "README.md").write_text("notes")
    logits, _ = rwkvcpu.load(folder).forward([1, 2, 3])
    want, _ = rwkvcpu.load(path).forward([1, 2, 3])
    assert np.array_equal(logits, want)
    assert rwkvcpu.load(folder).info["dtype"] == "fp32"
    _make(folder, seed=1)    # a second model file: which one is meant is no longer clear
    with pytest.raises(ModelFormatError, match="several"):
        rwkvcpu.load(folder)
