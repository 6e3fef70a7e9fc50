"""BlinkDL's official checkpoints as data, and a writer of such files without torch.

For tests and benchmarks only (not part of the installed package): benchmarks
import it from this folder, pytest finds it through `pythonpath` in pyproject.toml.

- `OFFICIAL_TENSORS`: the key names and shapes of an official .pth for every
  generation (v4, v5.0, v5.1, v5.2, v6, v7); released checkpoints store every
  tensor as bfloat16 (`OFFICIAL_DTYPE`).
- `official_tensors(...)`: that table resolved for given dimensions.
- `random_official_state_dict(...)`: weights at those names and shapes with
  the magnitudes trained models have, for oracle tests and benchmarks.
- `write_pth(...)`: a torch.save-compatible zip (bf16/fp16/fp32) written in
  pure Python; torch.load and the reference `rwkv` package read it.

Example:
    >>> sd = random_official_state_dict("v7", n_layer=2, n_embd=128, vocab_size=256)
    >>> write_pth("tiny-v7.pth", sd)           # bf16, like the released models
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from rwkvcpu.config import GENERATIONS
from rwkvcpu.quant.readers.pth import contiguous_strides

OFFICIAL_DTYPE = "bf16"


class OfficialTensor(NamedTuple):
    name: str              # per-layer names relative to "blocks.{i}."
    shape: tuple           # symbols: V D F H S, Ew Ed (v6 E_maa, E_decay), Dw Da Dv Dg (v7)
    generations: tuple     # where it exists
    layers: str = "all"    # "all", "first" (layer 0 only)


_ALL = GENERATIONS
_V5 = ("v5.0", "v5.1", "v5.2")
_V5_GATED = ("v5.1", "v5.2")
_V4_V5 = ("v4",) + _V5
_V4_V6 = _V4_V5 + ("v6",)
_U = (1, 1, "D")     # official vectors carry two unit dimensions

GLOBAL = (
    OfficialTensor("emb.weight", ("V", "D"), _ALL),
    OfficialTensor("ln_out.weight", ("D",), _ALL),
    OfficialTensor("ln_out.bias", ("D",), _ALL),
    OfficialTensor("head.weight", ("V", "D"), _ALL),
)

BLOCK = (
    OfficialTensor("ln0.weight", ("D",), _ALL, layers="first"),
    OfficialTensor("ln0.bias", ("D",), _ALL, layers="first"),
    OfficialTensor("ln1.weight", ("D",), _ALL),
    OfficialTensor("ln1.bias", ("D",), _ALL),
    OfficialTensor("ln2.weight", ("D",), _ALL),
    OfficialTensor("ln2.bias", ("D",), _ALL),
    # v4 and v5: mix coefficients x*mix + prev*(1-mix)
    OfficialTensor("att.time_mix_k", _U, _V4_V5),
    OfficialTensor("att.time_mix_v", _U, _V4_V5),
    OfficialTensor("att.time_mix_r", _U, _V4_V5),
    OfficialTensor("att.time_mix_g", _U, _V5_GATED),
    OfficialTensor("att.time_decay", ("D",), ("v4",)),
    OfficialTensor("att.time_first", ("D",), ("v4",)),
    OfficialTensor("att.time_decay", ("H",), ("v5.0", "v5.1")),
    OfficialTensor("att.time_first", ("H",), ("v5.0",)),
    OfficialTensor("att.time_faaaa", ("H",), ("v5.1",)),
    OfficialTensor("att.time_decay", ("H", "S"), ("v5.2",)),
    OfficialTensor("att.time_faaaa", ("H", "S"), ("v5.2", "v6")),
    # v6: data-dependent mix and decay
    OfficialTensor("att.time_maa_x", _U, ("v6",)),
    OfficialTensor("att.time_maa_w", _U, ("v6",)),
    OfficialTensor("att.time_maa_k", _U, ("v6",)),
    OfficialTensor("att.time_maa_v", _U, ("v6",)),
    OfficialTensor("att.time_maa_r", _U, ("v6",)),
    OfficialTensor("att.time_maa_g", _U, ("v6",)),
    OfficialTensor("att.time_maa_w1", ("D", "5Ew"), ("v6",)),
    OfficialTensor("att.time_maa_w2", (5, "Ew", "D"), ("v6",)),
    OfficialTensor("att.time_decay", _U, ("v6",)),
    OfficialTensor("att.time_decay_w1", ("D", "Ed"), ("v6",)),
    OfficialTensor("att.time_decay_w2", ("Ed", "D"), ("v6",)),
    # v7
    OfficialTensor("att.x_r", _U, ("v7",)),
    OfficialTensor("att.x_w", _U, ("v7",)),
    OfficialTensor("att.x_k", _U, ("v7",)),
    OfficialTensor("att.x_v", _U, ("v7",)),
    OfficialTensor("att.x_a", _U, ("v7",)),
    OfficialTensor("att.x_g", _U, ("v7",)),
    OfficialTensor("att.w0", _U, ("v7",)),
    OfficialTensor("att.w1", ("D", "Dw"), ("v7",)),
    OfficialTensor("att.w2", ("Dw", "D"), ("v7",)),
    OfficialTensor("att.a0", _U, ("v7",)),
    OfficialTensor("att.a1", ("D", "Da"), ("v7",)),
    OfficialTensor("att.a2", ("Da", "D"), ("v7",)),
    # Present in layer 0 too, where the value residual is unused.
    OfficialTensor("att.v0", _U, ("v7",)),
    OfficialTensor("att.v1", ("D", "Dv"), ("v7",)),
    OfficialTensor("att.v2", ("Dv", "D"), ("v7",)),
    OfficialTensor("att.g1", ("D", "Dg"), ("v7",)),
    OfficialTensor("att.g2", ("Dg", "D"), ("v7",)),
    OfficialTensor("att.k_k", _U, ("v7",)),
    OfficialTensor("att.k_a", _U, ("v7",)),
    OfficialTensor("att.r_k", ("H", "S"), ("v7",)),
    # time mix matrices (stored (out, in), used as x @ W.T)
    OfficialTensor("att.key.weight", ("D", "D"), _ALL),
    OfficialTensor("att.value.weight", ("D", "D"), _ALL),
    OfficialTensor("att.receptance.weight", ("D", "D"), _ALL),
    OfficialTensor("att.gate.weight", ("D", "D"), _V5_GATED + ("v6",)),
    OfficialTensor("att.output.weight", ("D", "D"), _ALL),
    OfficialTensor("att.ln_x.weight", ("D",), _V5 + ("v6", "v7")),
    OfficialTensor("att.ln_x.bias", ("D",), _V5 + ("v6", "v7")),
    # channel mix
    OfficialTensor("ffn.time_mix_k", _U, _V4_V5),
    OfficialTensor("ffn.time_mix_r", _U, _V4_V5),
    OfficialTensor("ffn.time_maa_k", _U, ("v6",)),
    OfficialTensor("ffn.time_maa_r", _U, ("v6",)),
    OfficialTensor("ffn.x_k", _U, ("v7",)),
    OfficialTensor("ffn.key.weight", ("F", "D"), _ALL),
    OfficialTensor("ffn.receptance.weight", ("D", "D"), _V4_V6),
    OfficialTensor("ffn.value.weight", ("D", "F"), _ALL),
)

# State tuning adds one tensor per layer (v5, v6, v7), [head, value, key].
TIME_STATE = OfficialTensor("att.time_state", ("H", "S", "S"), _V5 + ("v6", "v7"))


def _widths_v4_v5(d):
    return {"F": 4 * d}


def _widths_v6(d):
    ffn = int(d * 3.5) // 32 * 32
    return {"F": ffn, "Ew": 32 if d < 4096 else 64, "Ed": 64 if d < 4096 else 128}


def _v7_rank(mult, d):
    """A v7 low-rank width: mult * sqrt(D), rounded to a multiple of 32, at least 32."""
    return max(32, int(round(mult * math.sqrt(d) / 32) * 32))


def _widths_v7(d):
    return {"F": 4 * d, "Dw": _v7_rank(2.5, d), "Da": _v7_rank(2.5, d),
            "Dv": _v7_rank(1.7, d), "Dg": _v7_rank(5, d)}


# generation -> its official widths for a model width D; v4 and v5 (and any
# name not listed) have only the channel mix's.
_DEFAULT_WIDTHS = {"v6": _widths_v6, "v7": _widths_v7}


def default_dims(generation: str, n_embd: int, head_size: int = 64) -> dict:
    """Channel-mix and low-rank widths the official training code picks for a width."""
    return _DEFAULT_WIDTHS.get(generation, _widths_v4_v5)(n_embd)


def _resolve(dim, dims):
    if isinstance(dim, int):
        return dim
    if dim[0].isdigit():
        return int(dim[0]) * dims[dim[1:]]
    return dims[dim]


def official_tensors(generation, n_layer, n_embd, vocab_size, *, head_size=64, dim_ffn=None,
                     lora_dims=None, time_state=False) -> dict:
    """Official key -> shape for a model of these dimensions, in checkpoint order.

    Args:
        generation: "v4", "v5.0", "v5.1", "v5.2", "v6" or "v7".
        n_layer, n_embd, vocab_size: L, D, V.
        head_size: S (ignored for v4).
        dim_ffn: F (default: the official choice for the generation).
        lora_dims: override of the low-rank widths (Ew, Ed for v6; Dw, Da, Dv, Dg for v7).
        time_state: include state-tuning tensors.

    Returns:
        dict name -> shape tuple.

    Example:
        >>> official_tensors("v4", 1, 8, 16)["blocks.0.att.time_mix_k"]
        (1, 1, 8)
    """
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; expected one of {', '.join(GENERATIONS)}")
    dims = {"V": vocab_size, "D": n_embd, "S": head_size,
            "H": n_embd // head_size if head_size else 0}
    dims.update(default_dims(generation, n_embd, head_size))
    if dim_ffn is not None:
        dims["F"] = dim_ffn
    dims.update(lora_dims or {})
    out = {}
    for t in GLOBAL[:1]:
        out[t.name] = tuple(_resolve(d, dims) for d in t.shape)
    specs = BLOCK + ((TIME_STATE,) if time_state else ())
    for i in range(n_layer):
        for t in specs:
            if generation not in t.generations or (t.layers == "first" and i != 0):
                continue
            out[f"blocks.{i}.{t.name}"] = tuple(_resolve(d, dims) for d in t.shape)
    for t in GLOBAL[1:]:
        out[t.name] = tuple(_resolve(d, dims) for d in t.shape)
    return out


# ---------------------------------------------------------------- random weights

def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) to bfloat16, returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


def _value(rel, shape, rng, ctx):
    """Plausible trained-model values for one official tensor."""
    i, n_layer = ctx["layer"], ctx["n_layer"]
    depth = i / max(n_layer - 1, 1)
    n = int(np.prod(shape))
    lin = np.linspace(0.0, 1.0, n)

    def u(lo, hi):
        return rng.uniform(lo, hi, shape)

    def normal(std):
        return rng.normal(0.0, std, shape)

    if rel.endswith("weight") and rel.split(".")[-2] in ("ln0", "ln1", "ln2", "ln_out", "ln_x"):
        return 1.0 + normal(0.1)
    if rel.endswith("bias"):
        return normal(0.05)
    if rel == "emb.weight":
        return normal(1.0)
    if len(shape) >= 2 and rel.endswith(".weight"):
        # y = W x with unit-scale x gives unit-scale y.
        return normal(1.0 / math.sqrt(shape[-1]))
    last = rel.split(".")[-1]
    if last.startswith(("time_mix", "time_maa_")) and len(shape) == 3 and shape[0] == 1:
        return u(0.0, 1.0)
    if last.startswith("x_"):
        return u(0.0, 1.0)
    if last == "time_decay":
        if ctx["generation"] == "v4":
            # decay = -exp(w): from fast (w = 2) to nearly none (w = -5)
            return (-5.0 + 7.0 * lin ** (0.7 + 1.3 * depth)).reshape(shape) + normal(0.2)
        # v5/v6: decay = exp(-exp(w)) between ~0.05 and ~0.998
        return (-6.0 + 7.0 * lin ** (0.7 + 1.3 * depth)).reshape(shape) + normal(0.2)
    if last in ("time_first",):
        return (math.log(0.3) + normal(0.5)) if ctx["generation"] == "v4" else normal(0.5)
    if last == "time_faaaa":
        return u(-0.5, 1.0)
    if last in ("time_maa_w1", "time_decay_w1", "w1", "a1", "v1", "g1"):
        return normal(1.0 / math.sqrt(shape[0]))
    if last == "time_maa_w2":
        return normal(0.1 / math.sqrt(shape[1]))
    if last in ("time_decay_w2", "w2", "a2", "v2", "g2"):
        return normal(0.5 / math.sqrt(shape[0]))
    if last == "w0":
        return (-6.0 + 5.5 * lin).reshape(shape) + normal(0.2)
    if last == "a0":
        return normal(0.5)
    if last == "v0":
        return 0.7 + normal(0.3)
    if last == "k_k":
        return 0.8 + normal(0.1)
    if last == "k_a":
        return 1.0 + normal(0.05)
    if last == "r_k":
        return normal(0.3)
    if last == "time_state":
        return normal(0.3)
    raise KeyError(f"no random recipe for {rel}")


def iter_random_official(generation, n_layer, n_embd, vocab_size, *, head_size=64, seed=0,
                         dim_ffn=None, lora_dims=None, time_state=False, bf16=True):
    """Like random_official_state_dict, one (name, array) at a time (for big models)."""
    rng = np.random.default_rng(seed)
    for name, shape in official_tensors(generation, n_layer, n_embd, vocab_size, head_size=head_size,
                                        dim_ffn=dim_ffn, lora_dims=lora_dims,
                                        time_state=time_state).items():
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else 0
        rel = name.split(".", 2)[2] if name.startswith("blocks.") else name
        ctx = {"layer": layer, "n_layer": n_layer, "D": n_embd, "generation": generation}
        x = np.asarray(_value(rel, shape, rng, ctx), dtype=np.float32).reshape(shape)
        yield name, (to_bf16(x) if bf16 else x)


def random_official_state_dict(generation, n_layer, n_embd, vocab_size, *, head_size=64, seed=0,
                               dim_ffn=None, lora_dims=None, time_state=False, bf16=True) -> dict:
    """Random weights at the official names, shapes and magnitudes of a generation.

    Matrices are N(0, 1/sqrt(in)), so activations stay near unit scale and
    logits are well conditioned; decays, mixes and bonuses lie in the ranges of
    trained models. Values are rounded to bf16 (returned as float32) when
    `bf16`, so writing them as bf16 loses nothing and round-trip tests can be
    exact.

    Args:
        generation: "v4", "v5.0", "v5.1", "v5.2", "v6" or "v7".
        n_layer, n_embd, vocab_size: L, D, V.
        head_size: S (v5+).
        seed: random seed.
        dim_ffn, lora_dims: overrides of the official widths.
        time_state: also make state-tuning tensors.
        bf16: round values to bfloat16.

    Returns:
        dict name -> float32 array, in checkpoint order.

    Example:
        >>> sd = random_official_state_dict("v6", 2, 128, 256, head_size=32)
        >>> sd["blocks.0.att.time_maa_w1"].shape
        (128, 160)
    """
    return dict(iter_random_official(generation, n_layer, n_embd, vocab_size, head_size=head_size,
                                     seed=seed, dim_ffn=dim_ffn, lora_dims=lora_dims,
                                     time_state=time_state, bf16=bf16))


# ---------------------------------------------------------------- .pth writer

_STORAGE = {"bf16": ("BFloat16Storage", 2), "fp16": ("HalfStorage", 2), "fp32": ("FloatStorage", 4)}


def _raw_bytes(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        return (to_bf16(x).view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()
    if dtype == "fp16":
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def _pint(n: int) -> bytes:
    if 0 <= n < 256:
        return pickle.BININT1 + bytes([n])
    if -2**31 <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(b)]) + b


def _pstr(s: str) -> bytes:
    b = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _ptuple(items) -> bytes:
    items = list(items)
    if not items:
        return pickle.EMPTY_TUPLE
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _tensor_pickle(key: str, shape: tuple, dtype: str) -> bytes:
    storage, _ = _STORAGE[dtype]
    numel = int(np.prod(shape)) if shape else 1
    strides = contiguous_strides(shape)
    pid = _ptuple([_pstr("storage"), pickle.GLOBAL + f"torch\n{storage}\n".encode(),
                   _pstr(key), _pstr("cpu"), _pint(numel)]) + pickle.BINPERSID
    hooks = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    args = _ptuple([pid, _pint(0), _ptuple(_pint(d) for d in shape),
                    _ptuple(_pint(s) for s in strides), pickle.NEWFALSE, hooks])
    return pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + args + pickle.REDUCE


def write_pth(path, state_dict, dtype: Optional[str] = OFFICIAL_DTYPE) -> Path:
    """Write a state dict as a torch.save zip file, without torch.

    Args:
        path: output file.
        state_dict: dict name -> array, or an iterable of (name, array) pairs
            (written as they come, so a large model need not be in memory).
        dtype: "bf16", "fp16" or "fp32" for every tensor; None keeps each
            array's own dtype (float16 -> fp16, otherwise fp32).

    Returns:
        the path written.

    Example:
        >>> write_pth("x.pth", {"emb.weight": np.zeros((4, 2), np.float32)}, dtype="fp16")
    """
    path = Path(path)
    items = state_dict.items() if isinstance(state_dict, dict) else state_dict
    prefix = "archive/"
    body = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (name, arr) in enumerate(items):
            arr = np.asarray(arr)
            dt = dtype or ("fp16" if arr.dtype == np.float16 else "fp32")
            if dt not in _STORAGE:
                raise ValueError(f"unknown dtype {dt!r}; expected bf16, fp16 or fp32")
            _write_aligned(zf, f"{prefix}data/{key}", _raw_bytes(arr.astype(np.float32, copy=False), dt))
            body.append(_pstr(name) + _tensor_pickle(str(key), tuple(arr.shape), dt))
        pkl = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT
               + (pickle.MARK + b"".join(body) + pickle.SETITEMS if body else b"") + pickle.STOP)
        _write_aligned(zf, f"{prefix}data.pkl", pkl)
        _write_aligned(zf, f"{prefix}byteorder", b"little")
        _write_aligned(zf, f"{prefix}version", b"3\n")
    return path


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes, align: int = 64) -> None:
    """Store one member with its data at a multiple of `align` (as torch does), so
    readers can map tensors in place."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 4
    pad = (-header_end) % align
    # Extra field "FB" (as torch writes it): 2-byte id, 2-byte size, padding.
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data)


__all__ = ["OFFICIAL_TENSORS", "OFFICIAL_DTYPE", "official_tensors", "random_official_state_dict",
           "iter_random_official", "write_pth", "to_bf16", "default_dims"]

# Generation -> the OfficialTensor specs of its checkpoints (global and per layer).
OFFICIAL_TENSORS = {g: tuple(t for t in GLOBAL + BLOCK if g in t.generations) for g in GENERATIONS}


def main(argv=None):
    """`python benchmarks/checkpoints.py OUT.pth --generation v7 --layers 24 --width 1024 --vocab 65536`:
    write a random official-layout checkpoint (bf16), tensor by tensor, for benchmarks."""
    import argparse

    ap = argparse.ArgumentParser(prog="python benchmarks/checkpoints.py", description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--generation", default="v7", choices=GENERATIONS)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=OFFICIAL_DTYPE, choices=tuple(_STORAGE))
    ap.add_argument("--time-state", action="store_true", help="add state-tuning tensors")
    a = ap.parse_args(argv)
    tensors = iter_random_official(a.generation, a.layers, a.width, a.vocab, head_size=a.head_size,
                                   seed=a.seed, time_state=a.time_state)
    print(write_pth(a.out, tensors, dtype=a.dtype))


if __name__ == "__main__":
    main()
