"""Model files of every input format as data, to build valid ones and break them.

Each format is parsed into plain records (a .pth into its tensor records and
storages, an rwkv.cpp .bin into its header and tensor headers, a safetensors
file into its JSON header and data) and written back from them byte for byte,
so a test can change one field (a stride, a dimension, a data offset, a
metadata value) to anything, including values no writer would produce.
Used by tests/test_hostile_files.py (the cases of issue 11, one by one) and
tests/test_fuzz_files.py (the same, drawn by Hypothesis).

Example:
    >>> pth = pth_of({"emb.weight": np.zeros((4, 2), np.float32)})
    >>> pth.tensors[0] = pth.tensors[0]._replace(stride=(-2, 1), offset=6)
    >>> Path("bad.pth").write_bytes(pth_bytes(pth))
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from checkpoints import random_official_state_dict, to_bf16

# ---------------------------------------------------------------- .pth

_ITEM = {"BFloat16Storage": 2, "HalfStorage": 2, "FloatStorage": 4, "DoubleStorage": 8}


class PthTensor(NamedTuple):
    name: object          # the state-dict key (a str in a real file)
    storage: str          # torch storage class name, e.g. "BFloat16Storage"
    key: object           # the storage's name in the zip (data/<key>)
    numel: object         # the storage's length in items, as the pickle says
    shape: tuple
    stride: tuple
    offset: object        # storage offset, in items


class Pth(NamedTuple):
    tensors: list         # PthTensor
    storages: dict        # key -> raw bytes (stored as archive/data/<key>)
    nest: tuple = ()      # keys the state dict is nested under, e.g. ("state_dict",)


def _raw(x: np.ndarray, storage: str) -> bytes:
    if storage == "BFloat16Storage":
        return (to_bf16(x).view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()
    return np.ascontiguousarray(x, {"HalfStorage": "<f2", "FloatStorage": "<f4", "DoubleStorage": "<f8"}[storage]).tobytes()


def pth_of(state_dict: dict, storage: str = "BFloat16Storage") -> Pth:
    """A state dict of float32 arrays as a Pth (contiguous tensors, one storage each)."""
    tensors, storages = [], {}
    for i, (name, a) in enumerate(state_dict.items()):
        a = np.asarray(a, np.float32)
        strides, acc = [], 1
        for d in reversed(a.shape):
            strides.append(acc)
            acc *= d
        tensors.append(PthTensor(name, storage, str(i), a.size, tuple(a.shape), tuple(reversed(strides)), 0))
        storages[str(i)] = _raw(a, storage)
    return Pth(tensors, storages)


def pickled(v) -> bytes:
    """Pickle opcodes (protocol 2) building `v`: ints, floats, str, None, bools, tuples, lists, dicts."""
    if v is None:
        return pickle.NONE
    if isinstance(v, bool):
        return pickle.NEWTRUE if v else pickle.NEWFALSE
    if isinstance(v, int):
        if 0 <= v < 256:
            return pickle.BININT1 + bytes([v])
        if -2**31 <= v < 2**31:
            return pickle.BININT + struct.pack("<i", v)
        b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return pickle.LONG1 + bytes([len(b)]) + b
    if isinstance(v, float):
        return pickle.BINFLOAT + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        return pickle.BINUNICODE + struct.pack("<I", len(b)) + b
    if isinstance(v, tuple):
        return pickle.MARK + b"".join(pickled(x) for x in v) + pickle.TUPLE if v else pickle.EMPTY_TUPLE
    if isinstance(v, list):
        return pickle.EMPTY_LIST + (pickle.MARK + b"".join(pickled(x) for x in v) + pickle.APPENDS if v else b"")
    if isinstance(v, dict):
        body = b"".join(pickled(k) + pickled(x) for k, x in v.items())
        return pickle.EMPTY_DICT + (pickle.MARK + body + pickle.SETITEMS if v else b"")
    raise TypeError(type(v))


def _tensor_opcodes(t: PthTensor) -> bytes:
    pid = (pickle.MARK + pickled("storage") + pickle.GLOBAL + f"torch\n{t.storage}\n".encode()
           + pickled(t.key) + pickled("cpu") + pickled(t.numel) + pickle.TUPLE + pickle.BINPERSID)
    hooks = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    args = (pickle.MARK + pid + pickled(t.offset) + pickled(t.shape) + pickled(t.stride)
            + pickle.NEWFALSE + hooks + pickle.TUPLE)
    return pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + args + pickle.REDUCE


def state_dict_pickle(pth: Pth) -> bytes:
    """data.pkl of a Pth: {name: tensor, ...}, nested under pth.nest."""
    body = b"".join(pickled(t.name) + _tensor_opcodes(t) for t in pth.tensors)
    sd = pickle.EMPTY_DICT + (pickle.MARK + body + pickle.SETITEMS if body else b"")
    for key in reversed(pth.nest):
        sd = pickle.EMPTY_DICT + pickled(key) + sd + pickle.SETITEM
    return pickle.PROTO + b"\x02" + sd + pickle.STOP


def zip_bytes(members: dict, compress: tuple = ()) -> bytes:
    """A zip of {name: bytes}; the members named in `compress` deflated, the rest stored."""
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            zf.writestr(info, data)
    return bio.getvalue()


def pth_bytes(pth: Pth, *, data_pkl: Optional[bytes] = None, compress_pickle: bool = False) -> bytes:
    """A torch zip checkpoint of a Pth (or of the raw `data_pkl` given instead of its pickle)."""
    members = {"archive/data.pkl": state_dict_pickle(pth) if data_pkl is None else data_pkl}
    members.update({f"archive/data/{k}": v for k, v in pth.storages.items()})
    members["archive/version"] = b"3\n"
    return zip_bytes(members, ("archive/data.pkl",) if compress_pickle else ())


def shared_dicts_pickle(levels: int) -> bytes:
    """{"model": d, "module": d} nested `levels` deep, each level one dict reached twice:
    2**levels paths from a pickle of a few hundred bytes."""
    d: dict = {}
    for _ in range(levels):
        d = {"model": d, "module": d}
    return pickle.dumps(d, protocol=2)


def nested_dicts_pickle(depth: int) -> bytes:
    """{"model": {"model": ...}} `depth` deep, written without recursion."""
    return (pickle.PROTO + b"\x02" + (pickle.EMPTY_DICT + pickled("model")) * depth + pickle.EMPTY_DICT
            + pickle.SETITEM * depth + pickle.STOP)


def memo_bomb_pickle(index: int = 2**30) -> bytes:
    """A pickle whose one memo index would make the unpickler allocate index * 16 bytes."""
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", index) + pickle.STOP


def opcode_flood_pickle(n_ops: int) -> bytes:
    """A state dict preceded by n_ops cheap opcodes (None, pop): work out of all proportion to its content."""
    return pickle.PROTO + b"\x02" + (pickle.NONE + pickle.POP) * (n_ops // 2) + pickle.EMPTY_DICT + pickle.STOP


# ---------------------------------------------------------------- rwkv.cpp .bin

class GgmlTensor(NamedTuple):
    name: bytes
    type_id: int
    ne: tuple                      # ggml order (innermost first)
    data: bytes
    dim_count: Optional[int] = None   # as written; None: len(ne)
    key_len: Optional[int] = None     # as written; None: len(name)


class Ggml(NamedTuple):
    header: tuple        # magic, version, n_vocab, n_embed, n_layer, data_type
    tensors: list


_GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 7: (32, 22), 8: (32, 24), 9: (32, 34)}


def ggml_parse(raw: bytes) -> Ggml:
    """The records of a valid rwkv.cpp file."""
    header = struct.unpack_from("<Ii4i", raw, 0)
    off, tensors = 24, []
    while off < len(raw):
        dims, key_len, type_id = struct.unpack_from("<3i", raw, off)
        ne = struct.unpack_from(f"<{dims}i", raw, off + 12)
        off += 12 + 4 * dims
        name = raw[off:off + key_len]
        off += key_len
        per, size = _GGML_BLOCK[type_id]
        n = int(np.prod(ne)) // per * size
        tensors.append(GgmlTensor(name, type_id, tuple(ne), raw[off:off + n]))
        off += n
    return Ggml(header, tensors)


def ggml_bytes(g: Ggml) -> bytes:
    out = [struct.pack("<Ii4i", *g.header)]
    for t in g.tensors:
        dims = len(t.ne) if t.dim_count is None else t.dim_count
        out.append(struct.pack("<3i", dims, len(t.name) if t.key_len is None else t.key_len, t.type_id))
        out.append(b"".join(struct.pack("<i", d) for d in t.ne))
        out.append(t.name)
        out.append(t.data)
    return b"".join(out)


def official_ggml(generation="v4", seed=0) -> Ggml:
    """An FP32 rwkv.cpp file of a random official v4 model, as rwkv.cpp's converter writes it
    (vectors squeezed, time_decay stored as -exp(w)); for when ../shared's fixtures are absent."""
    sd = random_official_state_dict(generation, n_layer=2, n_embd=64, vocab_size=256, seed=seed)
    tensors = []
    for name, a in sd.items():
        a = np.asarray(a, np.float32)
        if a.ndim == 3 and a.shape[:2] == (1, 1):
            a = a.reshape(-1)
        if name.endswith("att.time_decay"):
            a = -np.exp(a.astype(np.float64)).astype(np.float32)
        tensors.append(GgmlTensor(name.encode(), 0, tuple(reversed(a.shape)), a.astype("<f4").tobytes()))
    return Ggml((0x67676D66, 101, 256, 64, 2, 0), tensors)


# ---------------------------------------------------------------- safetensors

def st_parse(raw: bytes) -> tuple:
    """(header object, data bytes) of a safetensors file."""
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_bytes(header, data: bytes, *, length: Optional[int] = None) -> bytes:
    """A safetensors file from a header (an object, or its JSON text as str/bytes) and data;
    `length` overrides the length prefix."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header)
    blob = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(blob) if length is None else length % 2**64) + blob + data


def with_nonfinite(data: bytes, offset: int, dtype: str, value: float) -> bytes:
    """`data` with the item of `dtype` ("F32", "F16", "BF16") at byte `offset` set to `value` (NaN, inf)."""
    if dtype == "BF16":
        item = (np.array([value], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        item = np.array([value], {"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
    return data[:offset] + item + data[offset + len(item):]


# ---------------------------------------------------------------- seeds

DIMS = dict(n_layer=2, n_embd=64, vocab_size=256, head_size=32)


def official_state_dict(generation="v7", seed=0, **kw) -> dict:
    return random_official_state_dict(generation, **{**DIMS, **kw}, seed=seed)


class Seeds(NamedTuple):
    """Valid files of every input format (see build_seeds)."""
    pth: dict            # generation -> official .pth (bf16)
    ours: dict           # (generation, dtype) -> rwkvcpu .safetensors
    ggml: dict           # name -> rwkv.cpp .bin
    hf: dict             # "transformers" / "fla" -> Hugging Face folder
    state: Path          # a State.save file of ours[("v7", "fp32")]
    statetune: Path      # time_state tensors for pth["v7"] (convert --state)
    text: Path           # a short UTF-8 text (perplexity)

    def __repr__(self):
        return f"Seeds({self.state.parent})"

    def warm(self) -> list:
        """One file per generation and matrix format: loading and running them compiles
        every kernel a case may run."""
        return sorted(set(self.ours.values()))


GENERATIONS = ("v4", "v5.2", "v6", "v7")


def build_seeds(folder: Path, shared: Optional[Path] = None) -> Seeds:
    """Write the seed files into `folder`; rwkv.cpp seeds come from ../shared's tiny models
    (FP16 and Q5_1 of every generation) when given, else from a random v4."""
    from safetensors.numpy import save_file

    from rwkvcpu.quant.convert import convert
    from checkpoints import write_pth
    from rwkvcpu.state import State
    from test_readers_hf import DIMS as HF_DIMS
    from test_readers_hf import fla_names, transformers_names

    folder.mkdir(parents=True, exist_ok=True)
    pth, ours = {}, {}
    for gen in GENERATIONS:
        sd = official_state_dict(gen, seed=1, time_state=gen == "v7")
        states = {k: v for k, v in sd.items() if k.endswith("time_state")}
        pth[gen] = write_pth(folder / f"{gen}.pth", {k: v for k, v in sd.items() if k not in states})
        if states:
            statetune = write_pth(folder / f"{gen}-state.pth", states)
        for dtype in (("fp32", "fp16", "int8", "int4") if gen == "v7" else ("int8",)):
            ours[(gen, dtype)] = folder / f"{gen}-{dtype}.safetensors"
            convert(pth[gen], ours[(gen, dtype)], dtype=dtype, progress=False)
    ggml = {}
    if shared is not None:
        from conftest import TINY_STEMS
        for gen, stem in TINY_STEMS.items():
            for variant in ("FP16", "Q5_1"):
                ggml[f"{gen}-{variant}"] = shared / "fixtures" / "tiny-rwkv" / f"{stem}-{variant}.bin"
    else:
        ggml["v4-FP32"] = folder / "v4-rwkvcpp.bin"
        ggml["v4-FP32"].write_bytes(ggml_bytes(official_ggml("v4")))
    hf = {}
    sd4 = random_official_state_dict("v4", **HF_DIMS)
    hf["transformers"] = folder / "hf-transformers"
    hf["transformers"].mkdir(exist_ok=True)
    (hf["transformers"] / "config.json").write_text(json.dumps({"architectures": ["RwkvForCausalLM"]}))
    save_file(transformers_names(sd4), hf["transformers"] / "model.safetensors")
    sd7 = random_official_state_dict("v7", **HF_DIMS)
    hf["fla"] = folder / "hf-fla"
    hf["fla"].mkdir(exist_ok=True)
    (hf["fla"] / "config.json").write_text(json.dumps(
        {"architectures": ["RWKV7ForCausalLM"], "head_dim": 32, "norm_eps": 1e-5}))
    save_file(fla_names(sd7), hf["fla"] / "model.safetensors")
    import rwkvcpu
    model = rwkvcpu.load(ours[("v7", "fp32")], threads=1)
    _, st = model.forward([1, 2, 3])
    state = folder / "v7.state"
    State.save(st, state)
    text = folder / "text.txt"
    text.write_text("Once upon a time there was a model file.\n", encoding="utf-8")
    return Seeds(pth, ours, ggml, hf, state, statetune, text)


# ---------------------------------------------------------------- the contract

def broken_promise(report: dict, names, dst: Optional[Path] = None) -> Optional[str]:
    """What a sandbox report (tests/sandbox.py) breaks of the promise for bad input, or None.

    The promise: the case ends by itself (no hang, no crash, no memory bomb:
    a MemoryError under the sandbox's limit counts as one); it succeeds, or it
    fails with one line naming the file (exit code 2 for the CLI, an
    RwkvCpuError for the API) and no traceback; no warning reaches the user;
    logits that come back are finite; a failed conversion leaves nothing at
    its destination.

    Args:
        report: from Sandbox.run.
        names: strings of which the error must contain one (the file's path or name).
        dst: the conversion's destination, if the case converts.
    """
    status = report["status"]
    if status != "done":
        return f"the case did not end cleanly: {status} after {report['seconds']} s; stderr: {report['stderr'][-2000:]}"
    err, out = report["stderr"], report["stdout"]
    if "Traceback" in err:
        return f"a traceback reached stderr: {err[-3000:]}"
    if "Warning" in err:
        return f"a warning reached stderr: {err[-2000:]}"
    if report.get("warnings"):
        return f"the API raised warnings: {report['warnings'][:3]}"
    failed = False
    if report["error"] is not None:
        e = report["error"]
        failed = True
        if not e["ours"]:
            return f"{e['type']} instead of an RwkvCpuError: {e['message'][:500]}\n{e['traceback']}"
        if "\n" in e["message"]:
            return f"a message of several lines: {e['message'][:1000]!r}"
        if not any(str(n) in e["message"] for n in names):
            return f"the message does not name the file ({names[0]}): {e['message'][:500]}"
    elif report["exit"] is not None:
        code = report["exit"]
        if code not in (0, 2):
            return f"exit code {code}; stderr: {err[-2000:]}"
        if code == 2:
            failed = True
            lines = err.splitlines()
            if len(lines) != 1 or not lines[0].startswith("error: "):
                return f"not one 'error: ' line on stderr: {err[-2000:]!r}"
            if not any(str(n) in lines[0] for n in names):
                return f"the error does not name the file ({names[0]}): {lines[0][:500]}"
    if report.get("finite") is False:
        return "the model returned NaN or infinite logits without a word"
    if failed and dst is not None:
        dst = Path(dst)
        left = [p.name for p in dst.parent.iterdir() if p.name == dst.name or p.name.startswith(f".{dst.name}")]
        if left:
            return f"a failed conversion left {left} behind"
    return None
