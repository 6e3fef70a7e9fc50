"""Property: no model file, however broken, makes rwkvcpu crash, hang, blow up memory or
return NaN silently.

Hypothesis draws mutations of valid files of every input format (an official .pth: its
tensor records, storages, pickle and zip; an rwkv.cpp .bin: its header and tensor
headers; our .safetensors: its JSON header, metadata and data; Hugging Face folders:
config.json, shard index and weights; saved states; state-tuning files), writes the
result, and runs a command on it in a child process with a memory limit and a timeout
(tests/sandbox.py). Every case must keep hostile_files.broken_promise: succeed, or fail
with one line naming the file (exit 2 / an RwkvCpuError), nothing left behind, no
warning, no NaN logits.

Budget: the default run draws a fixed set of examples (derandomized, so CI is
repeatable) and takes under a minute. Before a release, run many more, freshly
random each time:

    RWKVCPU_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz_files.py

(RWKVCPU_FUZZ_EXAMPLES is the number of examples per format; Hypothesis prints a
failing example and the seed to replay it with --hypothesis-seed). See
docs/HOSTILE_INPUT.md, also for the coverage-guided fuzzer of the parsers.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzing tests need hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hostile_files import (Pth, broken_promise, ggml_bytes, ggml_parse, pth_bytes, st_bytes,  # noqa: E402
                           st_parse, state_dict_pickle, with_nonfinite)

# Examples per format: RWKVCPU_FUZZ_EXAMPLES for a long run, else each test's default.
LONG = int(os.environ.get("RWKVCPU_FUZZ_EXAMPLES", "0") or 0)
THREADS = ("--threads", "1")


def budget(default: int):
    return settings(max_examples=LONG or default, deadline=None, derandomize=not LONG,
                    database=None if not LONG else hypothesis.settings.default.database,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ------------------------------------------------------------------ values

EDGE_INTS = [0, 1, -1, 2, 3, 5, 31, 32, 63, 64, 65, 127, 255, 256, 1023, 65535, 2**31 - 1, -2**31, 2**32,
             2**53, 2**62, 2**63 - 1, -2**63, 2**64, 10**30]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-300, 300), st.integers(-2**70, 2**70))
int32s = st.one_of(st.sampled_from([v for v in EDGE_INTS if -2**31 <= v < 2**31]), st.integers(-2**31, 2**31 - 1))
junk = st.one_of(ints, st.floats(), st.text(max_size=4), st.none(), st.booleans(),
                 st.lists(st.integers(-3, 70), max_size=3))
shapes = st.lists(ints, min_size=0, max_size=5).map(tuple)
EDGE_STRINGS = ["", "0", "1", "-1", "2", "64", "1000000000", "1e3", "abc", "nan", "inf", "-0.5", "[]", "{}", "[1, 2]",
                '{"Dw": -1}', '{"Dw": 1e400}', "v4", "v5.2", "v7", "v8", "world", "bytes", "embedded", "neox-20b",
                "rwkvcpu", "rwkvcpu-state", "fp32", "int4", "q9", "9" * 5000, "\x1b[2J\n", "x" * 100_000]
strings = st.one_of(st.sampled_from(EDGE_STRINGS), st.text(max_size=12))
nonfinite = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@st.composite
def byte_edits(draw, size: int, max_edits: int = 3):
    """A list of raw edits of a file of `size` bytes: (kind, position, value)."""
    edits = []
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["flip", "truncate", "int32", "int64", "insert", "delete", "append"]))
        pos = draw(st.one_of(st.integers(0, min(size, 4096)), st.integers(0, max(size - 1, 0))))
        edits.append((kind, pos, draw(st.integers(0, 2**64 - 1))))
    return edits


def apply_byte_edits(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, value in edits:
        pos = min(pos, len(b))
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << (value % 8)
        elif kind == "truncate":
            del b[pos:]
        elif kind == "int32":
            b[pos:pos + 4] = (value % 2**32).to_bytes(4, "little")
        elif kind == "int64":
            b[pos:pos + 8] = value.to_bytes(8, "little")
        elif kind == "insert":
            b[pos:pos] = value.to_bytes(8, "little")[: 1 + value % 8]
        elif kind == "delete":
            del b[pos:pos + 1 + value % 64]
        elif kind == "append":
            b += value.to_bytes(8, "little") * (1 + value % 4)
    return bytes(b)


# ------------------------------------------------------------------ running a case

def run_case(sandbox, target, args, names, dst=None, note=""):
    report = sandbox.run(target, [str(a) for a in args], timeout=20)
    problem = broken_promise(report, [str(n) for n in names], dst)
    assert problem is None, f"{target} {[str(a) for a in args]} ({note}): {problem}"


def model_commands(path, seeds, folder, ours):
    """The commands a model file meets: (target, args, destination)."""
    dst = Path(folder) / "out.safetensors"
    cases = [("cli", ["info", path], None), ("load", [path], None)]
    if ours:
        cases += [("cli", ["generate", "-m", path, "-n", "2", *THREADS, "hi"], None),
                  ("cli", ["perplexity", path, seeds.text, *THREADS], None),
                  ("cli", ["bench", path, "-n", "1", "--prompt", "1", "--no-bandwidth", *THREADS], None)]
    else:
        cases += [("cli", ["convert", path, dst, "--dtype", "int4"], dst), ("convert", [path, dst, "fp16"], dst)]
    return cases


# ------------------------------------------------------------------ official .pth

PTH_FIELDS = ("shape", "stride", "offset", "numel", "storage", "key", "name")
STORAGES = ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "ByteStorage",
            "UntypedStorage", "Foo"]


@st.composite
def pth_mutation(draw, n_tensors: int):
    kind = draw(st.sampled_from(["field", "field", "field", "data", "structure", "pickle", "zip"]))
    i = draw(st.integers(0, n_tensors - 1))
    if kind == "field":
        field = draw(st.sampled_from(PTH_FIELDS))
        value = {"shape": st.one_of(shapes, junk), "stride": st.one_of(shapes, junk),
                 "offset": st.one_of(ints, junk), "numel": st.one_of(ints, junk),
                 "storage": st.sampled_from(STORAGES),
                 "key": st.one_of(st.sampled_from(["0", "1", "999", ""]), junk),
                 "name": st.one_of(st.builds(lambda n, r: f"blocks.{n}.{r}", ints,
                                             st.sampled_from(["ln1.weight", "att.r_k", "x"])),
                                   strings, junk)}[field]
        return ("field", i, field, draw(value))
    if kind == "data":
        return ("data", i, draw(st.integers(0, 2**20)), draw(st.one_of(nonfinite, st.just("cut"))))
    if kind == "structure":
        return ("structure", i, draw(st.sampled_from(["drop", "duplicate", "nest", "nest_odd", "alias"])))
    if kind == "pickle":
        return ("pickle", draw(byte_edits(4096)), draw(st.booleans()))
    return ("zip", draw(byte_edits(1 << 20)))


def mutated_pth(pth: Pth, m) -> bytes:
    tensors, storages = list(pth.tensors), dict(pth.storages)
    if m[0] == "field":
        _, i, field, value = m
        tensors[i] = tensors[i]._replace(**{field: value})
        return pth_bytes(pth._replace(tensors=tensors))
    if m[0] == "data":
        _, i, at, value = m
        t = tensors[i]
        raw = storages[t.key]
        if value == "cut":
            storages[t.key] = raw[: at % max(len(raw), 1)]
        else:
            item = {"BFloat16Storage": "BF16", "HalfStorage": "F16", "FloatStorage": "F32"}[t.storage]
            size = 4 if item == "F32" else 2
            storages[t.key] = with_nonfinite(raw, (at % max(len(raw) // size, 1)) * size, item, value)
        return pth_bytes(pth._replace(storages=storages))
    if m[0] == "structure":
        _, i, how = m
        if how == "drop":
            del tensors[i]
        elif how == "duplicate":
            tensors.append(tensors[i])
        elif how == "nest":
            return pth_bytes(pth._replace(nest=("state_dict",)))
        elif how == "nest_odd":
            return pth_bytes(pth._replace(nest=("model", "module", "state_dict", "model", "model")))
        elif how == "alias":
            # A second name for the same storage, as torch writes views (and tied weights).
            tensors.append(tensors[i]._replace(name=str(tensors[i].name) + ".again"))
        return pth_bytes(pth._replace(tensors=tensors))
    if m[0] == "pickle":
        _, edits, compress = m
        return pth_bytes(pth, data_pkl=apply_byte_edits(state_dict_pickle(pth), edits), compress_pickle=compress)
    return apply_byte_edits(pth_bytes(pth), m[1])


class Records(dict):
    """Parsed seed files by name (a short repr: Hypothesis prints its arguments when a case fails)."""

    def __repr__(self):
        return f"Records({sorted(self)})"


@pytest.fixture(scope="module")
def pth_seeds(seeds):
    from hostile_files import official_state_dict, pth_of
    return Records({gen: pth_of(official_state_dict(gen, seed=2)) for gen in ("v4", "v5.2", "v6", "v7")})


@budget(60)
@given(data=st.data())
def test_fuzz_pth(sandbox, seeds, pth_seeds, data):
    gen = data.draw(st.sampled_from(sorted(pth_seeds)), label="generation")
    pth = pth_seeds[gen]
    mutation = data.draw(pth_mutation(len(pth.tensors)), label="mutation")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.pth"
        path.write_bytes(mutated_pth(pth, mutation))
        target, args, dst = data.draw(st.sampled_from(model_commands(path, seeds, folder, ours=False)), label="command")
        run_case(sandbox, target, args, [path], dst, f"{gen} {mutation!r:.300}")


# ------------------------------------------------------------------ rwkv.cpp .bin

@st.composite
def ggml_mutation(draw, g):
    kind = draw(st.sampled_from(["header", "tensor", "tensor", "tensor", "data", "drop", "bytes"]))
    i = draw(st.integers(0, len(g.tensors) - 1))
    if kind == "header":
        return ("header", draw(st.integers(0, 5)), draw(int32s))
    if kind == "tensor":
        field = draw(st.sampled_from(["ne", "dim_count", "key_len", "type_id", "name"]))
        value = {"ne": st.lists(int32s, min_size=1, max_size=4).map(tuple), "dim_count": st.integers(-3, 10),
                 "key_len": st.one_of(st.integers(-3, 1030), int32s), "type_id": st.one_of(st.integers(-1, 12), int32s),
                 "name": st.one_of(st.binary(max_size=20), st.sampled_from([b"blocks.99999999999.ln1.weight",
                                                                            b"\xff\xfe", b"emb.weight"]))}[field]
        return ("tensor", i, field, draw(value))
    if kind == "data":
        return ("data", i, draw(st.integers(0, 2**20)), draw(nonfinite))
    if kind == "drop":
        return ("drop", i)
    return ("bytes", draw(byte_edits(1 << 21)))


def mutated_ggml(g, m) -> bytes:
    tensors = list(g.tensors)
    if m[0] == "header":
        header = list(g.header)
        header[m[1]] = m[2] % 2**32 if m[1] == 0 else m[2]
        return ggml_bytes(g._replace(header=tuple(header)))
    if m[0] == "tensor":
        _, i, field, value = m
        tensors[i] = tensors[i]._replace(**{field: value})
    elif m[0] == "data":
        _, i, at, value = m
        t = tensors[i]
        if t.type_id in (0, 1):
            size = 4 if t.type_id == 0 else 2
            tensors[i] = t._replace(data=with_nonfinite(t.data, (at % max(len(t.data) // size, 1)) * size,
                                                        "F32" if size == 4 else "F16", value))
        else:
            # A quantized block's scale (its first two bytes, fp16).
            blocks = len(t.data) // 24 if t.type_id == 8 else max(len(t.data) // 22, 1)
            size = 24 if t.type_id == 8 else 22
            tensors[i] = t._replace(data=with_nonfinite(t.data, (at % blocks) * size, "F16", value))
    elif m[0] == "drop":
        del tensors[m[1]]
    else:
        return apply_byte_edits(ggml_bytes(g), m[1])
    return ggml_bytes(g._replace(tensors=tensors))


@pytest.fixture(scope="module")
def ggml_seeds(seeds):
    return Records({name: ggml_parse(path.read_bytes()) for name, path in seeds.ggml.items()})


@budget(40)
@given(data=st.data())
def test_fuzz_rwkv_cpp(sandbox, seeds, ggml_seeds, data):
    name = data.draw(st.sampled_from(sorted(ggml_seeds)), label="seed")
    g = ggml_seeds[name]
    mutation = data.draw(ggml_mutation(g), label="mutation")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.bin"
        path.write_bytes(mutated_ggml(g, mutation))
        target, args, dst = data.draw(st.sampled_from(model_commands(path, seeds, folder, ours=False)), label="command")
        run_case(sandbox, target, args, [path], dst, f"{name} {mutation!r:.300}")


# ------------------------------------------------------------------ safetensors (ours, plain, states)

META_KEYS = ["format", "format_version", "generation", "n_layer", "n_embd", "vocab_size", "dim_ffn", "head_size",
             "n_head", "group_norm_eps", "lora_dims", "tokenizer", "tokenizer_json", "eos_token_id", "dtype",
             "fingerprint", "config"]


@st.composite
def st_mutation(draw, header):
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["entry", "entry", "metadata", "metadata", "structure", "data", "text", "bytes"]))
    if kind == "entry":
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        value = {"dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "I64", "BOOL",
                                                     "F8_E4M3", "Q4"]), junk),
                 "shape": st.one_of(st.lists(ints, max_size=4), junk, st.just([1] * 40)),
                 "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), junk,
                                           st.sampled_from(["shift", "overlap", "swap"])),
                 "whole": junk}[field]
        return ("entry", name, field, draw(value))
    if kind == "metadata":
        return ("metadata", draw(st.sampled_from(META_KEYS)),
                draw(st.one_of(strings, st.none(), st.just(5), st.just([]), st.just({}))))
    if kind == "structure":
        return ("structure", draw(st.sampled_from(names)),
                draw(st.sampled_from(["drop", "rename_layer", "metadata_list", "no_metadata", "extra"])))
    if kind == "data":
        return ("data", draw(st.sampled_from(names)), draw(st.integers(0, 2**20)), draw(nonfinite))
    if kind == "text":
        return ("text", draw(st.sampled_from(names)), draw(st.sampled_from(["duplicate", "deep", "bad_utf8", "length"])),
                draw(st.integers(0, 2**64 - 1)))
    return ("bytes", draw(byte_edits(1 << 20)))


def mutated_safetensors(raw: bytes, m) -> bytes:
    header, data = st_parse(raw)
    if m[0] == "entry":
        _, name, field, value = m
        e = header[name]
        if field == "whole":
            header[name] = value
        elif field == "data_offsets" and value == "shift":
            e["data_offsets"] = [o + 1 for o in e["data_offsets"]]
        elif field == "data_offsets" and value == "overlap":
            other = next((v for k, v in header.items() if k not in (name, "__metadata__")), e)
            e["data_offsets"] = list(other["data_offsets"])
        elif field == "data_offsets" and value == "swap":
            e["data_offsets"] = e["data_offsets"][::-1]
        else:
            e[field] = value
    elif m[0] == "metadata":
        _, key, value = m
        meta = header.setdefault("__metadata__", {})
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    elif m[0] == "structure":
        _, name, how = m
        if how == "drop":
            del header[name]
        elif how == "rename_layer":
            header[name.replace("blocks.0.", "blocks.99999999999.").replace("blocks.1.", "blocks.7.")] = header.pop(name)
        elif how == "metadata_list":
            header["__metadata__"] = list(header.get("__metadata__", {}).items())
        elif how == "no_metadata":
            header.pop("__metadata__", None)
        else:
            header[name + ".extra"] = dict(header[name])
    elif m[0] == "data":
        _, name, at, value = m
        e = header[name]
        if e["dtype"] in ("F32", "F16", "BF16"):
            size = 4 if e["dtype"] == "F32" else 2
            begin, end = e["data_offsets"]
            n = max((end - begin) // size, 1)
            data = with_nonfinite(data, begin + (at % n) * size, e["dtype"], value)
    elif m[0] == "text":
        _, name, how, value = m
        text = json.dumps(header)
        if how == "duplicate":
            text = text[:-1] + ", " + json.dumps({name: header[name]})[1:-1] + "}"
        elif how == "deep":
            text = text[:-1] + ', "x": ' + "[" * (value % 200_000) + "]" * (value % 200_000) + "}"
        elif how == "bad_utf8":
            return st_bytes(text.encode()[:-1] + b"\xff}", data)
        else:
            return st_bytes(text, data, length=value)
        return st_bytes(text, data)
    else:
        return apply_byte_edits(raw, m[1])
    return st_bytes(header, data)


@budget(60)
@given(data=st.data())
def test_fuzz_rwkvcpu_files(sandbox, seeds, data):
    key = data.draw(st.sampled_from(sorted(seeds.ours)), label="seed")
    raw = seeds.ours[key].read_bytes()
    mutation = data.draw(st_mutation(st_parse(raw)[0]), label="mutation")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(mutated_safetensors(raw, mutation))
        target, args, dst = data.draw(st.sampled_from(model_commands(path, seeds, folder, ours=True)), label="command")
        run_case(sandbox, target, args, [path], dst, f"{key} {mutation!r:.300}")


@budget(30)
@given(data=st.data())
def test_fuzz_state_files(sandbox, seeds, data):
    raw = seeds.state.read_bytes()
    mutation = data.draw(st_mutation(st_parse(raw)[0]), label="mutation")
    model = seeds.ours[("v7", "fp32")]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.state"
        path.write_bytes(mutated_safetensors(raw, mutation))
        target, args = data.draw(st.sampled_from([("state_load", [path, model]),
                                                  ("cli", ["chat", "-m", model, "--load", path, *THREADS])]),
                                 label="command")
        run_case(sandbox, target, args, [path], None, f"{mutation!r:.300}")


# ------------------------------------------------------------------ Hugging Face folders

@pytest.fixture(scope="module")
def hf_headers(seeds):
    return Records({name: st_parse((folder / "model.safetensors").read_bytes())[0] for name, folder in seeds.hf.items()})


@budget(30)
@given(data=st.data())
def test_fuzz_hugging_face_folders(sandbox, seeds, hf_headers, data):
    name = data.draw(st.sampled_from(sorted(seeds.hf)), label="seed")
    kind = data.draw(st.sampled_from(["config", "config_raw", "index", "weights", "weights"]), label="part")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(seeds.hf[name], folder)
        if kind == "config":
            cfg = json.loads((folder / "config.json").read_text())
            cfg[data.draw(st.sampled_from(["architectures", "norm_eps", "head_dim"]))] = data.draw(
                st.one_of(junk, st.just(["RwkvForCausalLM"]), st.just(["LlamaForCausalLM"])), label="value")
            (folder / "config.json").write_text(json.dumps(cfg))
        elif kind == "config_raw":
            (folder / "config.json").write_bytes(data.draw(st.sampled_from(
                [b"", b"[", b"[1]", b"\xff", b"[" * 5000, b"null", b'"x"']), label="config"))
        elif kind == "index":
            (folder / "model.safetensors.index.json").write_text(json.dumps(data.draw(st.one_of(junk, st.sampled_from([
                {"weight_map": {"x": "../outside.safetensors"}}, {"weight_map": {"x": "/dev/zero"}},
                {"weight_map": {"x": "missing.safetensors"}}, {"weight_map": {"x": "model.safetensors"}},
                {"weight_map": []}, {"weight_map": {"x": 5}}, {}])), label="index")))
        else:
            raw = (folder / "model.safetensors").read_bytes()
            mutation = data.draw(st_mutation(hf_headers[name]), label="mutation")
            (folder / "model.safetensors").write_bytes(mutated_safetensors(raw, mutation))
        target, args, dst = data.draw(st.sampled_from(model_commands(folder, seeds, tmp, ours=False)), label="command")
        run_case(sandbox, target, args, [folder], dst, f"{name} {kind}")


# ------------------------------------------------------------------ state-tuning files (convert --state)

@budget(20)
@given(data=st.data())
def test_fuzz_state_tuning_files(sandbox, seeds, pth_seeds, data):
    from hostile_files import pth_of
    from rwkvcpu.quant.readers.pth import PthSource
    with PthSource(seeds.statetune) as src:
        states = {name: src.load(name) for name in src.tensors()}
    pth = pth_of(states)
    mutation = data.draw(pth_mutation(len(pth.tensors)), label="mutation")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.pth"
        path.write_bytes(mutated_pth(pth, mutation))
        dst = Path(folder) / "out.safetensors"
        run_case(sandbox, "cli", ["convert", seeds.pth["v7"], dst, "--state", path], [path, seeds.pth["v7"]], dst,
                 f"{mutation!r:.300}")


# ------------------------------------------------------------------ llama.cpp .gguf

GGUF_SEEDS = ("v7-d64-F16.gguf", "v6-d64-mixed.gguf", "v7-d256-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def gguf_seeds():
    """Committed llama.cpp fixtures with the place of every integer in their headers (counts, string
    and array lengths, value types, tensor dimensions, types and offsets) and of their tensors' data."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install '.[gguf]')")
    out = {}
    for name in GGUF_SEEDS:
        path = Path(__file__).resolve().parent / "fixtures" / "gguf" / name
        reader = gguf.GGUFReader(path)
        spots = []
        for field in list(reader.fields.values()) + [t.field for t in reader.tensors]:
            pos = field.offset
            for part in field.parts:
                if part.dtype.kind in "ui" and part.size <= 4:
                    spots += [(pos + k * part.itemsize, part.itemsize) for k in range(part.size)]
                pos += part.nbytes
        data = [(t.data_offset, t.tensor_type.name, t.n_bytes) for t in reader.tensors]
        out[name] = (path.read_bytes(), spots, data)
    return Records(out)


@st.composite
def gguf_mutation(draw, seed):
    raw, spots, data = seed
    kind = draw(st.sampled_from(["header", "header", "header", "data", "bytes"]))
    if kind == "header":
        return ("header", draw(st.integers(0, len(spots) - 1)), draw(st.one_of(ints, st.integers(0, 2**64 - 1))))
    if kind == "data":
        return ("data", draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 2**20)), draw(nonfinite))
    return ("bytes", draw(byte_edits(len(raw))))


def mutated_gguf(seed, m) -> bytes:
    raw, spots, data = seed
    if m[0] == "header":
        pos, width = spots[m[1]]
        return raw[:pos] + (m[2] % 2 ** (8 * width)).to_bytes(width, "little") + raw[pos + width:]
    if m[0] == "data":
        offset, typ, nbytes = data[m[1]]
        # a float's value, or a quantized block's first fp16 scale
        size = {"F32": 4, "F16": 2, "BF16": 2}.get(typ, 0)
        block = size or {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176,
                         "Q6_K": 210}[typ]
        at = offset + (m[2] % max(nbytes // block, 1)) * block + (208 if typ == "Q6_K" else 0)
        return raw[:at] + with_nonfinite(raw[at:at + 4], 0, typ if size else "F16", m[3]) + raw[at + 4:]
    return apply_byte_edits(raw, m[1])


@budget(30)
@given(data=st.data())
def test_fuzz_gguf(sandbox, gguf_seeds, data):
    name = data.draw(st.sampled_from(sorted(gguf_seeds)), label="seed")
    mutation = data.draw(gguf_mutation(gguf_seeds[name]), label="mutation")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.gguf"
        path.write_bytes(mutated_gguf(gguf_seeds[name], mutation))
        dst = Path(folder) / "out.safetensors"
        # the small fixtures' vocabulary is not World: --tokenizer lets conversion reach every tensor
        target, args, dst = data.draw(st.sampled_from([
            ("cli", ["info", path], None), ("load", [path], None),
            ("cli", ["convert", path, dst, "--tokenizer", "bytes", "--dtype", "int4"], dst)]), label="command")
        run_case(sandbox, target, args, [path], dst, f"{name} {mutation!r:.300}")
