"""Reader of rwkv.cpp model files (.bin, magic "ggmf").

Layout (all little-endian int32):

    header:  magic 0x67676d66, version, n_vocab, n_embed, n_layer, data_type
    tensor:  dim_count, key_length, data_type, shape[dim_count] (reversed:
             innermost dimension first), key (UTF-8), data

Data types: 0 FP32, 1 FP16, 2 Q4_0, 3 Q4_1, 7 Q5_0, 8 Q5_1, 9 Q8_0. The
quantized ones are ggml blocks of 32 weights along a row (version 101 layout,
ggml of May 2023):

    Q4_0  fp16 d, u8 qs[16]                   w = (q - 8) * d
    Q4_1  fp16 d, fp16 m, u8 qs[16]           w = q * d + m
    Q5_0  fp16 d, u32 qh, u8 qs[16]           w = (q - 16) * d
    Q5_1  fp16 d, fp16 m, u32 qh, u8 qs[16]   w = q * d + m
    Q8_0  fp16 d, i8 qs[32]                   w = q * d

In the 4/5-bit formats, byte j of qs holds weight j in its low nibble and
weight j + 16 in its high nibble; bit j of qh is the fifth bit of weight j.
Version 100 files used an older block layout for the quantized types; their
FP32/FP16 tensors are identical, so version 100 is read when no tensor is
quantized.

The values are still rwkv.cpp's (e.g. v4 time_decay stored as -exp(w));
quant/canonical.py knows those transforms.
"""

from __future__ import annotations

import struct

import numpy as np

from rwkvcpu.errors import ModelFormatError

from .base import RWKV_CPP, MappedSource, TensorInfo, as_float32, numel

MAGIC = 0x67676D66
VERSIONS = (100, 101)
QK = 32


class _Type:
    def __init__(self, name, block_elems, block_bytes):
        self.name, self.block_elems, self.block_bytes = name, block_elems, block_bytes

    def nbytes(self, n_elems):
        return n_elems // self.block_elems * self.block_bytes


TYPES = {
    0: _Type("F32", 1, 4),
    1: _Type("F16", 1, 2),
    2: _Type("Q4_0", QK, 18),
    3: _Type("Q4_1", QK, 20),
    7: _Type("Q5_0", QK, 22),
    8: _Type("Q5_1", QK, 24),
    9: _Type("Q8_0", QK, 34),
}
TYPES_BY_NAME = {t.name: t for t in TYPES.values()}
FLOATS = {"F32": np.float32, "F16": np.float16}

# rwkv.cpp's ln_x epsilon per generation family (rwkv_graph.inc): v5 normalises
# with 1e-5; v6 scales by 1/8 before a 1e-5 norm (the same as 64e-5) and later
# versions call the norm with 64e-5 directly; v7 uses 64e-5.
GROUP_NORM_EPS = {"v5": 1e-5, "v6": 64e-5, "v7": 64e-5}


def is_ggml(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC


class GgmlSource(MappedSource):
    """A rwkv.cpp .bin file, indexed on open; tensors dequantized on load.

    Example:
        >>> with GgmlSource("tiny-rwkv-6v0-1m-Q5_1.bin") as src:
        ...     w = src.load("blocks.0.att.key.weight")   # (64, 64) float32
    """

    format = "rwkv.cpp"
    naming = RWKV_CPP

    def _index(self):
        f, p = self._file, self.path
        if f.size < 24:
            raise ModelFormatError(f"{p}: truncated rwkv.cpp header ({f.size} bytes, needs 24)")
        magic, version, n_vocab, n_embed, n_layer, data_type = struct.unpack_from("<Ii4i", f.mm, 0)
        if magic != MAGIC:
            raise ModelFormatError(f"{p}: not an rwkv.cpp model (magic {magic:#010x}, expected {MAGIC:#010x})")
        if version not in VERSIONS:
            raise ModelFormatError(
                f"{p}: rwkv.cpp file version {version} is not supported (only 100 and 101); "
                f"re-create it with a current rwkv.cpp")
        self.version = version
        off = 24
        while off < f.size:
            if off + 12 > f.size:
                raise ModelFormatError(f"{p}: truncated tensor header at byte {off}")
            dim_count, key_len, dtype = struct.unpack_from("<3i", f.mm, off)
            if not 1 <= dim_count <= 4 or not 1 <= key_len <= 1024:
                raise ModelFormatError(
                    f"{p}: corrupt tensor header at byte {off} ({dim_count} dims, key of {key_len} bytes)")
            off += 12
            if off + 4 * dim_count + key_len > f.size:
                raise ModelFormatError(f"{p}: truncated tensor header at byte {off}")
            ne = struct.unpack_from(f"<{dim_count}i", f.mm, off)
            off += 4 * dim_count
            try:
                name = bytes(f.mm[off:off + key_len]).decode("utf-8")
            except UnicodeDecodeError:
                raise ModelFormatError(f"{p}: corrupt tensor name at byte {off}") from None
            off += key_len
            if dtype not in TYPES:
                raise ModelFormatError(f"{p}: tensor {name!r} has unknown rwkv.cpp data type {dtype}")
            if name in self._infos:
                raise ModelFormatError(f"{p}: tensor {name!r} appears twice")
            t = TYPES[dtype]
            if any(d <= 0 for d in ne):
                raise ModelFormatError(f"{p}: tensor {name!r} has a bad shape {tuple(reversed(ne))}")
            if t.block_elems > 1:
                if version == 100:
                    raise ModelFormatError(
                        f"{p}: tensor {name!r} is {t.name} in the version-100 block layout, which "
                        f"rwkvcpu does not read; convert from the FP16/FP32 file or re-quantize "
                        f"with a current rwkv.cpp")
                if ne[0] % t.block_elems:
                    raise ModelFormatError(
                        f"{p}: tensor {name!r} is {t.name} but its rows ({ne[0]}) are not whole blocks")
            # Python integers: dimensions of up to 2^31 each multiply past 2^63 without wrapping.
            nbytes = t.nbytes(numel(ne))
            if off + nbytes > f.size:
                raise ModelFormatError(
                    f"{p}: truncated in tensor {name!r} (needs {off + nbytes:,} bytes, file has {f.size:,})")
            shape = tuple(reversed(ne))
            self._infos[name] = TensorInfo(name, shape, t.name, nbytes)
            self._offsets[name] = off
            off += nbytes
        if not self._infos:
            raise ModelFormatError(f"{p}: rwkv.cpp file holds no tensors")
        self.details = {
            "rwkv.cpp version": str(version),
            "rwkv.cpp data type": TYPES.get(data_type, _Type(str(data_type), 1, 1)).name,
            "header n_vocab, n_embed, n_layer": f"{n_vocab}, {n_embed}, {n_layer}",
        }
        self.header = {"n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer}

    def group_norm_eps(self, family):
        return GROUP_NORM_EPS.get(family)

    def load(self, name):
        info = self.info(name)
        off = self._offsets[name]
        if info.dtype in FLOATS:
            raw = self._file.array(FLOATS[info.dtype], off, numel(info.shape)).reshape(info.shape)
            return as_float32(raw, info.dtype)
        blocks = self._file.array(np.uint8, off, info.nbytes).reshape(-1, TYPES_BY_NAME[info.dtype].block_bytes)
        # An infinite scale times a zero weight is NaN: the converter names the tensor (rwkvcpu.checks),
        # numpy's warning would not.
        with np.errstate(over="ignore", invalid="ignore"):
            return DEQUANTIZE[info.dtype](blocks).reshape(info.shape)


# Dequantization of ggml blocks: each takes (n_blocks, block_bytes) uint8 and
# returns (n_blocks * 32,) float32 in weight order.

def _f16(blocks, at):
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)   # (n, 1)


def _nibbles(qs):
    # qs: (n, 16) uint8 -> (n, 32): low nibbles are weights 0..15, high 16..31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)


def _f32(q):
    # Small integers times an fp16 scale are exact in float32, as in ggml.
    return q.astype(np.float32)


def _fifth_bits(blocks, at):
    qh = blocks[:, at:at + 4].copy().view("<u4").astype(np.uint32)         # (n, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4


def _q4_0(b):
    return (_f32(_nibbles(b[:, 2:18]) - 8) * _f16(b, 0)).ravel()


def _q4_1(b):
    return (_f32(_nibbles(b[:, 4:20])) * _f16(b, 0) + _f16(b, 2)).ravel()


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | _fifth_bits(b, 2)
    return (_f32(q - 16) * _f16(b, 0)).ravel()


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | _fifth_bits(b, 4)
    return (_f32(q) * _f16(b, 0) + _f16(b, 2)).ravel()


def _q8_0(b):
    return (b[:, 2:34].view(np.int8).astype(np.float32) * _f16(b, 0)).ravel()


DEQUANTIZE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0}
