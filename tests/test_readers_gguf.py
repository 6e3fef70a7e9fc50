"""llama.cpp GGUF files (rwkv6, rwkv7) against the official checkpoints they were made from.

The fixtures in tests/fixtures/gguf were written by llama.cpp's own tools
(convert_hf_to_gguf.py, llama-quantize; how, in that folder's README.md) from
the random models of reference/gguf_models.py, which the tests make again
from their seeds. Float files must give the official model back (BF16 and F32
exactly, F16 up to its subnormals; logits within 1e-4); quantized files must
stay within the rounding error of each tensor type and a KL bound on logits.
"""

import collections
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install '.[gguf]')")

import rwkvcpu  # noqa: E402
from rwkvcpu.errors import ConversionError, ModelFormatError, UnsupportedModelError  # noqa: E402
from rwkvcpu.quant.convert import convert, read_checkpoint  # noqa: E402
from checkpoints import write_pth  # noqa: E402
from rwkvcpu.quant.readers import open_source  # noqa: E402

from reference import gguf_models  # noqa: E402

HERE = Path(__file__).resolve().parent / "fixtures" / "gguf"
TOKENS = [3, 61, 200, 17, 99, 5, 140, 77, 250, 8, 33, 190]

# file -> (model, tensor types it holds as llama.cpp wrote it). Checked against the file by
# test_fixture_types: narrow rows make llama-quantize fall back to other types silently.
FILES = {
    "v7-d64-F16.gguf": ("v7-d64", {"F32": 36, "F16": 26}),
    "v7-d64-BF16.gguf": ("v7-d64", {"F32": 36, "BF16": 26}),
    "v7-d64-Q8_0.gguf": ("v7-d64", {"F32": 36, "Q8_0": 22, "F16": 4}),
    "v6-d64-F16.gguf": ("v6-d64", {"F32": 36, "F16": 18}),
    "v7-world-F16.gguf.xz": ("v7-world", {"F32": 36, "F16": 26}),
    "v6-d64-mixed.gguf": ("v6-d64", {"F32": 36, "Q8_0": 3, "Q5_1": 3, "Q5_0": 4, "Q4_1": 4, "Q4_0": 4}),
    "v7-d256-Q4_K_M.gguf": ("v7-d256", {"F32": 26, "Q4_K": 7, "Q6_K": 1}),
    "v6-d256-Q5_K_M.gguf": ("v6-d256", {"F32": 20, "Q5_K": 9, "Q6_K": 1}),
}
FLOAT_FILES = [f for f in FILES if f.split("-")[-1].split(".")[0] in ("F32", "F16", "BF16")]
QUANT_FILES = [f for f in FILES if f not in FLOAT_FILES]

# Largest relative RMS error ||deq(q(W)) - W|| / ||W|| of a matrix stored in each type.
# Derived for N(0, s) weights in blocks of 32 whose absolute maximum is about 2.1 s:
# a symmetric b-bit grid (Q8_0: d = max/127; Q5_0: max/16; Q4_0: max/8) errs by
# d / sqrt(12); the (min, max) grids of Q4_1 / Q5_1 span about 4.2 s in 15 / 31 steps.
# K-quants (super-blocks of 256 with quantized sub-block scales) land near their
# legacy siblings. Bounds are those figures with 50% headroom for the blocks' spread.
REL_ERROR = {"Q8_0": 0.008, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_0": 0.12, "Q4_1": 0.12,
             "Q6_K": 0.03, "Q5_K": 0.06, "Q4_K": 0.12}
# Mean KL(official || GGUF) of the next-token distributions over TOKENS, per quantized file:
# about twice the values measured (tests/fixtures/gguf/README.md), which only float summation
# order (AVX2 or AVX-512 builds, threads) can move. Random weights with a wide head make these
# larger than a trained model's would be.
KL_BOUND = {"v7-d64-Q8_0.gguf": 2.5e-4, "v6-d64-mixed.gguf": 0.012, "v7-d256-Q4_K_M.gguf": 0.016,
            "v6-d256-Q5_K_M.gguf": 0.005}


def fixture(name, tmp_path):
    """Path of a committed fixture; an .xz one is decompressed into tmp_path."""
    path = HERE / name
    if name.endswith(".xz"):
        out = tmp_path / name[:-3]
        with lzma.open(path) as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)
        return out
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """model name -> path of its official .pth (fp32), made again from the seed."""
    tmp = tmp_path_factory.mktemp("official")
    out = {}
    for name in {m for m, _ in FILES.values()}:
        sd = gguf_models.official(name)
        assert gguf_models.state_dict_sha256(sd) == gguf_models.SHA256[name], (
            f"{name}: the regenerated checkpoint is not the one the fixtures were made from "
            f"(numpy's random stream changed?)")
        out[name] = write_pth(tmp / f"{name}.pth", sd, dtype="fp32")
    return out


def _tokenizer(model):
    return None if model == "v7-world" else "bytes"


def _logits(path, tmp_path, tokenizer, dtype="fp32"):
    out = tmp_path / f"{Path(path).name}.{dtype}.safetensors"
    convert(path, out, dtype=dtype, tokenizer=tokenizer, progress=False)
    logits, _ = rwkvcpu.load(out).forward(TOKENS, all_logits=True)
    return logits


def _kl(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lp = np.log(p)
    q = q_logits - q_logits.max(-1, keepdims=True)
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    return float((p * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("name", sorted(FILES))
def test_fixture_types(name, tmp_path):
    """Each fixture holds the tensor types we say it does (read by the gguf package itself)."""
    reader = gguf.GGUFReader(fixture(name, tmp_path))
    assert dict(collections.Counter(t.tensor_type.name for t in reader.tensors)) == FILES[name][1]


def test_fast_metadata_reader_matches_the_package(tmp_path):
    """Our reader's shortcuts for metadata arrays give the gguf package's own fields."""
    from rwkvcpu.quant.readers.gguf_file import _strict_reader_class

    path = fixture("v7-world-F16.gguf.xz", tmp_path)
    stock, ours = gguf.GGUFReader(path), _strict_reader_class()(path)
    assert list(stock.fields) == list(ours.fields)
    for k, a in stock.fields.items():
        b = ours.fields[k]
        assert (a.offset, a.types, a.data) == (b.offset, b.types, b.data), k
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), k
    assert [(t.name, t.data_offset, t.n_bytes) for t in stock.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors]


@pytest.mark.parametrize("name", FLOAT_FILES)
def test_float_fixture_is_the_official_model(name, official, tmp_path):
    model = FILES[name][0]
    path = fixture(name, tmp_path)
    tok = _tokenizer(model)
    meta, got = read_checkpoint(path, dtype="fp32", tokenizer=tok)
    _, want = read_checkpoint(official[model], dtype="fp32", tokenizer=tok)
    assert meta["source_format"] == "gguf" and meta["generation"] == gguf_models.MODELS[model]["generation"]
    assert float(meta["group_norm_eps"]) == 64e-5
    assert set(got) == set(want)
    for k in want:
        # F16 holds the bf16 weights exactly except below its normal range (2^-14),
        # where its subnormals round to multiples of 2^-24 (half that error, doubled
        # where v6's layer 1 was divided by 2 before rounding and multiplied back).
        atol = 2.0 ** -24 if "F16" in name and "BF16" not in name else 0.0
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)
    diff = np.abs(_logits(path, tmp_path, tok) - _logits(official[model], tmp_path, tok)).max()
    assert diff <= 1e-4


def _relative_errors(path, pth):
    """{GGUF tensor type: [relative RMS error of each matrix stored in it]}."""
    errors = collections.defaultdict(list)
    with open_source(path) as g, open_source(pth) as o:
        for name, info in g.tensors().items():
            if info.dtype in REL_ERROR and len(info.shape) == 2:
                want = o.load(name).astype(np.float64)
                errors[info.dtype].append(float(np.linalg.norm(g.load(name) - want) / np.linalg.norm(want)))
    return errors


@pytest.mark.parametrize("name", QUANT_FILES)
def test_quantized_fixture_within_its_rounding(name, official, tmp_path):
    model = FILES[name][0]
    path = fixture(name, tmp_path)
    errors = _relative_errors(path, official[model])
    quantized = {t for t in FILES[name][1] if t in REL_ERROR}
    assert set(errors) == quantized
    for typ, errs in errors.items():
        assert max(errs) <= REL_ERROR[typ], (typ, max(errs))
        # and not suspiciously exact: a dequantizer that returned the source would pass the above
        assert min(errs) > REL_ERROR[typ] / 20, (typ, min(errs))
    tok = _tokenizer(model)
    kl = _kl(_logits(official[model], tmp_path, tok), _logits(path, tmp_path, tok))
    assert 0 < kl <= KL_BOUND[name]


def test_world_vocabulary_from_the_metadata(tmp_path):
    """llama.cpp's 'rwkv' vocabulary that matches ours token for token converts as World."""
    path = fixture("v7-world-F16.gguf.xz", tmp_path)
    with open_source(path) as src:
        assert src.tokenizer_name() == "world"
        tokens = src.metadata["tokenizer.ggml.tokens"]
        assert tokens[0] == b"<s>" and tokens[-1] == b"[PAD65535]"
        tokens[300] = b"x"
        with pytest.raises(ConversionError, match="differs from the World vocabulary at token 300"):
            src.tokenizer_name()
    meta, _ = read_checkpoint(path, dtype="fp32")
    assert meta["tokenizer"] == "world"
    # a vocabulary of another size is not World: the user names the tokenizer
    small = HERE / "v7-d64-F16.gguf"
    with pytest.raises(ConversionError, match="256 tokens, not the World vocabulary's 65530; pass --tokenizer"):
        read_checkpoint(small)
    assert read_checkpoint(small, tokenizer="bytes")[0]["tokenizer"] == "bytes"


def test_load_and_generate_from_gguf(tmp_path):
    path = fixture("v7-world-F16.gguf.xz", tmp_path)
    model = rwkvcpu.load(path, dtype="fp32")
    assert model.info["generation"] == "v7" and model.metadata["source_format"] == "gguf"
    assert len(model.complete("The", max_tokens=3, temperature=0)) > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkvcpu.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_info_and_convert(tmp_path):
    path = HERE / "v6-d64-F16.gguf"
    info = run_cli("info", path)
    assert info.returncode == 0, info.stderr
    for line in ("format:              gguf", "generation:          v6", "GGUF architecture:   rwkv6",
                 "GGUF tensor types:   F32 x36, F16 x18", "llama.cpp rescaling: every 1 layers (undone)",
                 "tensors:             54: F32 x36, F16 x18"):
        assert line in info.stdout, info.stdout
    assert "convertible:         yes, with --tokenizer (its rwkv vocabulary has 256 tokens" in info.stdout
    out = tmp_path / "v6.safetensors"
    bad = run_cli("convert", path, out)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "pass --tokenizer" in bad.stderr
    assert not out.exists()
    good = run_cli("convert", path, out, "--tokenizer", "bytes", "--dtype", "int8", "-q")
    assert good.returncode == 0, good.stderr
    assert rwkvcpu.load(out).metadata["source_format"] == "gguf"


# ---------------------------------------------------------------- bad input

def rewrite(src, dst, *, arch=None, drop=(), add=None, kv=None):
    """Copy a GGUF file with gguf.GGUFWriter, changing its architecture, tensors or metadata."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), arch)
    kv = dict(kv or {})
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        new = name.replace(f"{old_arch}.", f"{arch}.", 1)
        if new in kv:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        w.add_key_value(new, value, vtype, sub_type=sub)
    for name, (value, vtype) in kv.items():
        w.add_key_value(name, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(reversed([int(d) for d in t.shape])),
                     raw_dtype=t.tensor_type)
    for name, (arr, typ) in (add or {}).items():
        w.add_tensor(name, arr, raw_dtype=typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


SMALL = HERE / "v7-d64-F16.gguf"


def test_rewritten_copy_still_reads(tmp_path):
    """The rewriting helper itself keeps a file readable (so the refusals below are about their change)."""
    _, a = read_checkpoint(rewrite(SMALL, tmp_path / "same.gguf"), dtype="fp32", tokenizer="bytes")
    _, b = read_checkpoint(SMALL, dtype="fp32", tokenizer="bytes")
    assert all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("arch, message", [
    ("arwkv7", "is an ARWKV-7 .* model \\(GGUF architecture 'arwkv7'\\), which rwkvcpu does not run"),
    ("rwkv6qwen2", "is an RWKV6-Qwen2 .* \\(GGUF architecture 'rwkv6qwen2'\\)"),
    ("llama", "GGUF architecture 'llama' is not RWKV"),
])
def test_foreign_architectures_refused_by_name(tmp_path, arch, message):
    path = rewrite(SMALL, tmp_path / f"{arch}.gguf", arch=arch)
    with pytest.raises(UnsupportedModelError, match=message):
        read_checkpoint(path, tokenizer="bytes")


def test_variants_and_header_lies_refused(tmp_path):
    u32 = gguf.GGUFValueType.UINT32
    f32 = gguf.GGUFValueType.FLOAT32
    cases = [
        (dict(drop=("blk.1.time_mix_key.weight",)), ModelFormatError, "tensor blk.1.time_mix_key.weight is missing"),
        (dict(add={"blk.0.time_mix_extra.weight": (np.zeros(64, np.float32), gguf.GGMLQuantizationType.F32)}),
         UnsupportedModelError, "blk.0.time_mix_extra.weight"),
        (dict(kv={"rwkv7.block_count": (3, u32)}), ModelFormatError, "metadata says 3 layers"),
        (dict(kv={"rwkv7.embedding_length": (128, u32)}), ModelFormatError, "metadata says width 128"),
        (dict(kv={"rwkv7.wkv.head_size": (24, u32)}), ModelFormatError, "head size 24 .* does not divide"),
        (dict(kv={"rwkv7.attention.layer_norm_epsilon": (1e-6, f32)}), UnsupportedModelError,
         "layer norms use epsilon 1e-06"),
        (dict(add={"blk.0.q2.weight": (np.zeros((64, 84), np.uint8), gguf.GGMLQuantizationType.Q2_K)}),
         ModelFormatError, "is Q2_K, which rwkvcpu does not read"),
    ]
    for i, (change, error, message) in enumerate(cases):
        path = rewrite(SMALL, tmp_path / f"case{i}.gguf", **change)
        with pytest.raises(error, match=message):
            read_checkpoint(path, tokenizer="bytes")


def _tensor_offset_position(path, name):
    """File offset of the 'data offset' field in `name`'s tensor info."""
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    return t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:5])


def test_corrupt_bytes_refused_in_one_line(tmp_path):
    data = SMALL.read_bytes()
    reader = gguf.GGUFReader(SMALL)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first_tensor = reader.tensors[0]
    cases = {
        "truncated in the metadata": (data[:tokens.offset + 100], "truncated GGUF file"),
        "truncated in the data": (data[:first_tensor.data_offset + 10], "truncated in tensor|truncated GGUF"),
        "wrong magic": (b"GGUX" + data[4:], "unrecognised file"),
        "a lying array length": (data[:tokens.offset + 8 + len("tokenizer.ggml.tokens") + 8]
                                 + (2 ** 40).to_bytes(8, "little")
                                 + data[tokens.offset + 8 + len("tokenizer.ggml.tokens") + 16:],
                                 "claims 1099511627776 elements"),
        "a lying tensor count": (data[:8] + (10 ** 6).to_bytes(8, "little") + data[16:], "GGUF"),
    }
    pos = _tensor_offset_position(SMALL, reader.tensors[1].name)
    off0 = int.from_bytes(data[pos:pos + 8], "little")
    cases["overlapping tensors"] = (data[:pos] + (off0 - 16).to_bytes(8, "little") + data[pos + 8:], "overlap")
    cases["an offset past the end"] = (data[:pos] + (10 ** 9).to_bytes(8, "little") + data[pos + 8:], "truncated")
    for what, (blob, message) in cases.items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(blob)
        out = tmp_path / "out.safetensors"
        with pytest.raises(ModelFormatError, match=message):
            read_checkpoint(path, tokenizer="bytes")
        r = run_cli("convert", path, out, "--tokenizer", "bytes") if what == "overlapping tensors" else None
        if r is not None:
            assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
            assert not out.exists()


def test_fuzzed_files_fail_in_one_line_or_read(tmp_path):
    """Random byte changes (header or quantized data) and random cuts: our one-line error or a
    good read, no other exception, no warning, quickly."""
    import time
    import warnings

    from rwkvcpu.errors import RwkvCpuError

    src = HERE / "v6-d64-mixed.gguf"
    data = bytearray(src.read_bytes())
    header_end = gguf.GGUFReader(src).data_offset
    rng = np.random.default_rng(14)
    path = tmp_path / "fuzz.gguf"
    outcomes = collections.Counter()
    t0 = time.monotonic()
    for i in range(150):
        blob = bytearray(data)
        if i % 3 == 0:
            blob = blob[:int(rng.integers(1, len(blob)))]
        else:
            # counts and lengths are little-endian u64/u32: large values come from the high bytes
            end = header_end if i % 3 == 1 else len(blob)
            for pos in rng.integers(4, end, size=int(rng.integers(1, 4))):
                blob[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(blob))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                read_checkpoint(path, dtype="fp32", tokenizer="bytes")
            outcomes["read"] += 1
        except RwkvCpuError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 30 and outcomes["read"] > 10 and time.monotonic() - t0 < 120, outcomes
    # a Q4_K block whose scales are infinite (inf * 0 in the dequantizer): no numpy warning,
    # the converter's finiteness check refuses the tensor in one line
    k_file = HERE / "v7-d256-Q4_K_M.gguf"
    t = next(t for t in gguf.GGUFReader(k_file).tensors if t.tensor_type.name == "Q4_K")
    blob = bytearray(k_file.read_bytes())
    blob[t.data_offset:t.data_offset + 4] = np.array([np.inf, np.inf], np.float16).tobytes()
    path.write_bytes(bytes(blob))
    with warnings.catch_warnings(), pytest.raises(ModelFormatError, match="'emb.weight' holds NaN or infinite"):
        warnings.simplefilter("error")
        read_checkpoint(path, dtype="fp32", tokenizer="bytes")


def test_older_v6_files_with_one_tensor_per_lerp(tmp_path):
    """llama.cpp files from before the token-shift lerps were fused (2024) read the same."""
    src = HERE / "v6-d64-F16.gguf"
    reader = gguf.GGUFReader(src)
    fused = {t.name: np.array(t.data) for t in reader.tensors if t.name.endswith("time_mix_lerp_fused.weight")}
    add = {}
    for name, rows in fused.items():
        for r, c in enumerate("wkvrg"):
            add[name.replace("lerp_fused", f"lerp_{c}")] = (np.ascontiguousarray(rows.reshape(5, -1)[r]),
                                                           gguf.GGMLQuantizationType.F32)
    old = rewrite(src, tmp_path / "old.gguf", drop=tuple(fused), add=add)
    _, a = read_checkpoint(old, dtype="fp32", tokenizer="bytes")
    _, b = read_checkpoint(src, dtype="fp32", tokenizer="bytes")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in b)
    # and a v7 without the gate's token shift (5 rows: llama.cpp's wkv_has_gate=False) is refused
    five = {"blk.0.time_mix_lerp_fused.weight": (np.zeros((5, 1, 1, 64), np.float32), gguf.GGMLQuantizationType.F32)}
    path = rewrite(SMALL, tmp_path / "nogate.gguf", drop=tuple(five), add=five)
    with pytest.raises(UnsupportedModelError, match="not 6 token-shift rows"):
        read_checkpoint(path, tokenizer="bytes")


def test_without_the_gguf_package_one_line(monkeypatch):
    """Without the extra, a .gguf is recognised and the message says what to install."""
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModelFormatError, match=r"is a GGUF file; reading it needs the gguf package: "
                                               r"pip install 'rwkvcpu\[gguf\]'"):
        read_checkpoint(SMALL, tokenizer="bytes")
