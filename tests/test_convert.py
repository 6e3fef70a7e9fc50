"""Conversion of the shared tiny rwkv.cpp models, the writer's file layout, metadata."""

import hashlib
import json
import re
import struct

from pathlib import Path

import numpy as np
import pytest

import rwkvcpu.tokenizers
from conftest import TINY_STEMS, TINY_VARIANTS, tiny_model_path
from rwkvcpu.errors import ConversionError
from rwkvcpu.layouts import expected_tensors
from rwkvcpu.config import ModelConfig
from rwkvcpu.quant.convert import convert, read_checkpoint
from checkpoints import random_official_state_dict, write_pth
from rwkvcpu.quant.readers.ggml import GgmlSource
from rwkvcpu.quant.writer import SafetensorsWriter

DTYPES = ("fp32", "fp16", "int8", "int4")
ITEMSIZE = {"F32": 4, "F16": 2, "I8": 1, "U8": 1}
NEOX_TOKENIZER = Path(rwkvcpu.tokenizers.__file__).parent / "20B_tokenizer.json"


def byte_level_source(kind, generation, tmp_path):
    """A byte-level (vocabulary 256) source file of a generation: a shared tiny rwkv.cpp
    FP16 model (skips without ../shared), or a random official .pth (always there)."""
    if kind == "rwkv.cpp":
        return tiny_model_path(generation, "FP16")
    sd = random_official_state_dict(generation, n_layer=2, n_embd=64, vocab_size=256, head_size=32)
    return write_pth(tmp_path / f"random-{generation}.pth", sd)


SOURCES = ("pth", "rwkv.cpp")


def _header(path):
    raw = open(path, "rb").read()
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), 8 + n, len(raw)


@pytest.mark.parametrize("gen", sorted(TINY_STEMS))
@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_every_tiny_fixture_variant_converts_to_every_dtype(tmp_path, gen, variant):
    from safetensors.numpy import load_file

    src = tiny_model_path(gen, variant)
    for dtype in DTYPES:
        dst = tmp_path / f"{dtype}.safetensors"
        meta = convert(src, dst, dtype=dtype, progress=False)
        assert meta["generation"] == gen and meta["dtype"] == dtype
        # The safetensors library reads our file, and it holds what read_checkpoint returns.
        on_disk = load_file(dst)
        _, in_memory = read_checkpoint(src, dtype=dtype)
        assert set(on_disk) == set(in_memory)
        for k, v in in_memory.items():
            assert on_disk[k].dtype == v.dtype and np.array_equal(on_disk[k], v), k
        # Exactly the canonical tensor list of the generation.
        config = ModelConfig.from_metadata(meta)
        stems = {k.removesuffix(".scale").removesuffix(".min") for k in on_disk}
        assert stems == set(expected_tensors(config, include_optional=False))


def _rwkv_cpp_documented(src, name, config):
    """Canonical tensor from an rwkv.cpp file per docs/FORMAT.md (independent rendering)."""
    H, S = config.n_head, config.head_size
    if name == "emb.weight":
        e = src.load("emb.weight").astype(np.float64)
        w, b = (src.load(f"blocks.0.ln0.{k}").astype(np.float64) for k in ("weight", "bias"))
        mu = e.mean(axis=1, keepdims=True)
        var = ((e - mu) ** 2).mean(axis=1, keepdims=True)
        return ((e - mu) / np.sqrt(var + 1e-5) * w + b).astype(np.float32)
    if not name.startswith("blocks."):
        return src.load(name)
    i, rel = name.split(".", 2)[1:]
    p = f"blocks.{i}."
    fam = config.family
    if ".time_maa_" in rel and fam in ("v4", "v5"):
        part, c = rel.split(".time_maa_")
        return (np.float32(1) - src.load(f"{p}{part}.time_mix_{c}")).reshape(-1)
    if rel == "att.log_decay":            # stored as -exp(w) already
        return src.load(p + "att.time_decay").reshape(-1)
    if rel in ("att.decay", "att.bonus") and fam == "v5":
        key = {"att.decay": "att.time_decay"}.get(rel) or (
            "att.time_first" if config.generation == "v5.0" else "att.time_faaaa")
        x = src.load(p + key).reshape(-1)   # exp(-exp(w)) and exp(u) already
        return np.repeat(x, S) if x.size == H else x
    if rel.startswith("att.x_") and fam == "v7":
        return src.load(p + "att.x_rwkvag").reshape(6, -1)["rwkvag".index(rel[-1])]
    if rel == "att.bonus":
        return src.load(p + "att.time_faaaa").reshape(-1) if fam == "v6" else src.load(p + "att.time_first")
    return src.load(p + rel)


@pytest.mark.parametrize("gen", sorted(TINY_STEMS))
def test_fp32_round_trip_reproduces_source_exactly(gen):
    path = tiny_model_path(gen, "FP32")
    meta, tensors = read_checkpoint(path, dtype="fp32")
    config = ModelConfig.from_metadata(meta)
    with GgmlSource(path) as src:
        for name, got in tensors.items():
            want = _rwkv_cpp_documented(src, name, config)
            if got.ndim == 1:
                # Vectors are squeezed (rwkv.cpp keeps some as (H, S, 1), (1, 1, D), ...).
                want = want.reshape(-1)
            assert got.shape == want.shape, (name, got.shape, want.shape)
            assert np.abs(got - want).max() == 0.0, name


def test_tiny_fixture_metadata(tmp_path):
    path = tiny_model_path("v5.0", "Q5_1")
    meta = convert(path, tmp_path / "m.safetensors", dtype="int8", progress=False)
    assert meta["format"] == "rwkvcpu" and meta["format_version"] == "1"
    assert meta["generation"] == "v5.0"          # rwkv.cpp calls this file "5v1"
    assert (meta["n_layer"], meta["n_embd"], meta["vocab_size"], meta["head_size"]) == ("12", "64", "256", "8")
    assert float(meta["group_norm_eps"]) == 1e-5  # rwkv.cpp's v5 graph
    assert meta["tokenizer"] == "bytes"
    assert meta["source_file"] == path.name and meta["source_format"] == "rwkv.cpp"
    assert meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "int8" in meta["quant_scheme"]
    header, _, _ = _header(tmp_path / "m.safetensors")
    assert header["__metadata__"] == meta
    # rwkv.cpp's v6 and v7 graphs normalise with 64e-5; --eps overrides any source.
    assert float(read_checkpoint(tiny_model_path("v6"), dtype="fp32")[0]["group_norm_eps"]) == 64e-5
    assert float(read_checkpoint(path, dtype="fp32", group_norm_eps=64e-5)[0]["group_norm_eps"]) == 64e-5


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tensor_is_aligned_to_its_itemsize(tmp_path, dtype, source):
    convert(byte_level_source(source, "v6", tmp_path), tmp_path / "m.safetensors", dtype=dtype, progress=False)
    header, start, size = _header(tmp_path / "m.safetensors")
    header.pop("__metadata__")
    assert start % 64 == 0
    ends = []
    for name, e in header.items():
        a, b = e["data_offsets"]
        assert (start + a) % ITEMSIZE[e["dtype"]] == 0, name
        ends.append((a, b))
    ends.sort()
    assert ends[0][0] == 0 and ends[-1][1] == size - start
    assert all(x[1] == y[0] for x, y in zip(ends, ends[1:]))     # no gaps, no overlap


def byte_tokenizer_json():
    """A Hugging Face tokenizer.json of 256 tokens, which fits a vocabulary-256 model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"<0x{i:02X}>": i for i in range(256)}, unk_token="<0x00>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


@pytest.mark.parametrize("source", SOURCES)
def test_tokenizer_choice_and_embedding(tmp_path, source):
    path = byte_level_source(source, "v7", tmp_path)
    assert read_checkpoint(path, dtype="fp32", tokenizer="bytes")[0]["tokenizer"] == "bytes"
    tok = tmp_path / "tokenizer.json"
    tok.write_text(byte_tokenizer_json(), encoding="utf-8")
    meta = convert(path, tmp_path / "m.safetensors", dtype="fp16", tokenizer=str(tok), progress=False)
    assert meta["tokenizer"] == "embedded"
    assert json.loads(meta["tokenizer_json"]) == json.loads(tok.read_text(encoding="utf-8"))
    # a tokenizer with more tokens than the model has logits is refused, whatever its kind
    for given, what in (("world", "the world tokenizer has 65536"), ("neox-20b", "the neox-20b tokenizer has 50277"),
                        (str(NEOX_TOKENIZER), f"the tokenizer in {NEOX_TOKENIZER} has 50277")):
        with pytest.raises(ConversionError, match="^" + re.escape(
                f"{path}: {what} tokens but the model only 256 logits; pass --tokenizer bytes")):
            read_checkpoint(path, tokenizer=given)
    with pytest.raises(ConversionError, match="neither world, neox-20b, bytes nor an existing"):
        read_checkpoint(path, tokenizer="gpt2")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not a usable Hugging Face tokenizer.json"):
        read_checkpoint(path, tokenizer=str(tmp_path / "bad.json"))


def test_writer_leaves_nothing_when_not_committed(tmp_path):
    dst = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(dst, {}, [("a", "F32", (2,)), ("b", "I8", (3,))]) as w:
            w.write("a", np.zeros(2, np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with SafetensorsWriter(dst, {}, [("a", "F32", (2,))]) as w:
        with pytest.raises(ConversionError, match="planned F32"):
            w.write("a", np.zeros(3, np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", SOURCES)
def test_eos_token_id_is_recorded_and_read_by_the_tokenizer(tmp_path, source):
    from rwkvcpu.tokenizers import load_tokenizer
    path = byte_level_source(source, "v7", tmp_path)
    meta, _ = read_checkpoint(path, dtype="fp32")
    assert "eos_token_id" not in meta and load_tokenizer(meta).eos_token_id is None   # bytes: none
    for given, want in ((10, 10), (0, 0), (-1, None)):
        meta = convert(path, tmp_path / "m.safetensors", dtype="fp32", eos_token_id=given, progress=False)
        assert meta["eos_token_id"] == str(given)
        assert load_tokenizer(_header(tmp_path / "m.safetensors")[0]["__metadata__"]).eos_token_id == want
    for bad in (256, -2, "3", 1.5):
        with pytest.raises(ConversionError, match="end-of-text token id"):
            read_checkpoint(path, dtype="fp32", eos_token_id=bad)
