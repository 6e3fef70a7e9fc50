"""rwkv.cpp .bin reader: header, every ggml block type, the shared tiny fixtures."""

import struct

import numpy as np
import pytest

from conftest import TINY_STEMS, TINY_VARIANTS, tiny_model_path
from rwkvcpu.errors import ModelFormatError
from rwkvcpu.quant.readers.ggml import GgmlSource

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 7, "Q5_1": 8, "Q8_0": 9}


def _blocks(kind, q, d, m):
    """ggml blocks (version 101) from integer weights q (n, 32), fp16 d and m (n,)."""
    d16 = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    m16 = m.astype("<f2").view(np.uint8).reshape(-1, 2)
    if kind == "Q8_0":
        return np.concatenate([d16, q.astype(np.int8).view(np.uint8)], axis=1)
    lo, hi = q[:, :16] & 0xF, q[:, 16:] & 0xF
    qs = (lo | (hi << 4)).astype(np.uint8)
    parts = [d16] + ([m16] if kind in ("Q4_1", "Q5_1") else [])
    if kind in ("Q5_0", "Q5_1"):
        bits = (q >> 4) & 1                                      # fifth bit of weight j -> bit j
        qh = (bits.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype("<u4")
        parts.append(qh.view(np.uint8).reshape(-1, 4))
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def write_ggml(path, tensors, version=101, header=(256, 64, 1, 0)):
    """A minimal rwkv.cpp file: tensors is [(name, ggml type, numpy shape, raw bytes)]."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Ii4i", 0x67676D66, version, *header))
        for name, kind, shape, raw in tensors:
            key = name.encode()
            f.write(struct.pack("<3i", len(shape), len(key), TYPE_IDS[kind]))
            f.write(struct.pack(f"<{len(shape)}i", *reversed(shape)))
            f.write(key)
            f.write(raw)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_types_decode_exactly(tmp_path, kind):
    rng = np.random.default_rng(1)
    rows, cols = 3, 64
    n = rows * cols // 32
    bits = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}[kind]
    if kind == "Q8_0":
        q = rng.integers(-127, 128, (n, 32))
    else:
        q = rng.integers(0, 2 ** bits, (n, 32))
    d = rng.uniform(0.001, 0.1, n).astype(np.float16)
    m = rng.uniform(-0.5, 0.5, n).astype(np.float16)
    raw = _blocks(kind, q, d, m).tobytes()
    write_ggml(tmp_path / "m.bin", [("w", kind, (rows, cols), raw)])
    offset = {"Q4_0": -8, "Q5_0": -16}.get(kind, 0)
    want = (q + offset).astype(np.float32) * d.astype(np.float32)[:, None]
    if kind in ("Q4_1", "Q5_1"):
        want = want + m.astype(np.float32)[:, None]
    with GgmlSource(tmp_path / "m.bin") as src:
        got = src.load("w")
        assert src.info("w").dtype == kind
    assert got.shape == (rows, cols) and got.dtype == np.float32
    assert np.abs(got - want.reshape(rows, cols)).max() == 0.0


def test_f16_and_f32_and_shape_order(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_ggml(tmp_path / "m.bin", [("a", "F32", (2, 3), a.tobytes()),
                                    ("b", "F16", (3, 2), a.T.astype(np.float16).tobytes())])
    with GgmlSource(tmp_path / "m.bin") as src:
        assert np.abs(src.load("a") - a).max() == 0.0
        assert np.abs(src.load("b") - a.T).max() == 0.0


def test_version_100_floats_read_but_quantized_refused(tmp_path):
    a = np.ones((2, 32), np.float32)
    write_ggml(tmp_path / "f.bin", [("a", "F32", (2, 32), a.tobytes())], version=100)
    with GgmlSource(tmp_path / "f.bin") as src:
        assert np.abs(src.load("a") - 1).max() == 0.0
    raw = _blocks("Q8_0", np.ones((2, 32), int), np.ones(2, np.float16), np.zeros(2, np.float16)).tobytes()
    write_ggml(tmp_path / "q.bin", [("a", "Q8_0", (2, 32), raw)], version=100)
    with pytest.raises(ModelFormatError, match="version-100 block layout"):
        GgmlSource(tmp_path / "q.bin")


@pytest.mark.parametrize("version", [1, 99, 102])
def test_other_versions_refused(tmp_path, version):
    write_ggml(tmp_path / "v.bin", [("a", "F32", (1,), b"\0" * 4)], version=version)
    with pytest.raises(ModelFormatError, match=f"version {version} is not supported"):
        GgmlSource(tmp_path / "v.bin")


def test_truncated_tensor_named(tmp_path):
    write_ggml(tmp_path / "t.bin", [("blocks.0.att.key.weight", "F32", (4, 4), b"\0" * 40)])
    with pytest.raises(ModelFormatError, match=r"truncated in tensor 'blocks.0.att.key.weight'"):
        GgmlSource(tmp_path / "t.bin")


@pytest.mark.parametrize("stem", sorted(TINY_STEMS))
@pytest.mark.parametrize("variant", [v for v in TINY_VARIANTS if v != "FP32"])
def test_tiny_fixture_variants_match_fp32(stem, variant):
    """FP16 and Q5 files decode to the FP32 file's values within their quantization error."""
    with GgmlSource(tiny_model_path(stem, "FP32")) as ref, GgmlSource(tiny_model_path(stem, variant)) as src:
        assert list(src.tensors()) == list(ref.tensors())
        for name, info in src.tensors().items():
            got, want = src.load(name), ref.load(name)
            assert got.shape == want.shape
            scale = np.abs(want).max()
            # Q5: 32 levels per block of 32 weights; FP16: 11 significant bits.
            tol = scale / 15 if info.dtype.startswith("Q") else scale * 2 ** -10
            assert np.abs(got - want).max() <= tol + 1e-6, name
