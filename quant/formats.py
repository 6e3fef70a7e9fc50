"""Storage formats of weight matrices: one class per format, in a registry.

A matrix W of shape (out, in) is stored as one or more safetensors tensors:

    fp32  W                      F32 (out, in)
    fp16  W                      F16 (out, in)
    int8  W                      I8  (out, in)         q in [-127, 127]
          W.scale                F16 (out, in // 64)   W[i, j] = q[i, j] * scale[i, j // 64]
    int4  W                      U8  (out, in // 2)    q in [0, 15], two per byte
          W.scale                F16 (out, in // 32)
          W.min                  F16 (out, in // 32)   W[i, j] = q[i, j] * scale[i, g] + min[i, g]

int4 packing: within each group of 32 weights, byte b (0..15) holds weight b in
its low nibble and weight b + 16 in its high nibble, so a kernel unpacks a
group with two contiguous 16-wide loops. int4's scale and min are fitted per
group by least squares (see Int4.quantize); the layout does not depend on it.

Groups run along the input dimension, so one outlier column spoils only the
32 or 64 weights of its group in each row, and a matrix-vector product applies
one scale per group (for int4 the min term is min * sum(x over the group),
and those sums are shared by every row).
"""

from __future__ import annotations

import numpy as np

from rwkvcpu.errors import ModelFormatError

# Rows quantized at a time: bounds the float32 temporaries to a few MB per chunk.
_CHUNK_ROWS = 1024


class Fp32:
    name = "fp32"
    suffixes = ("",)
    group = 1
    bits_per_weight = 32.0

    @staticmethod
    def parts(shape: tuple) -> dict:
        """The stored tensors of an (out, in) matrix: {suffix: (safetensors dtype, shape)}."""
        return {"": ("F32", tuple(shape))}

    @staticmethod
    def quantize(w: np.ndarray) -> dict:
        """w: (out, in) float32 -> {suffix: array}."""
        return {"": np.ascontiguousarray(w, dtype=np.float32)}

    @staticmethod
    def dequantize(parts: dict) -> np.ndarray:
        return np.asarray(parts[""], dtype=np.float32)


class Fp16:
    name = "fp16"
    suffixes = ("",)
    group = 1
    bits_per_weight = 16.0

    @staticmethod
    def parts(shape: tuple) -> dict:
        return {"": ("F16", tuple(shape))}

    @staticmethod
    def quantize(w: np.ndarray) -> dict:
        return {"": np.asarray(w, dtype=np.float32).astype(np.float16)}

    @staticmethod
    def dequantize(parts: dict) -> np.ndarray:
        return np.asarray(parts[""]).astype(np.float32)


class Int8:
    """Symmetric 8-bit, one fp16 scale per 64 weights of a row (8.25 bits/weight)."""

    name = "int8"
    suffixes = ("", ".scale")
    group = 64
    bits_per_weight = 8 + 16 / 64

    @classmethod
    def parts(cls, shape: tuple) -> dict:
        out_dim, in_dim = shape
        return {"": ("I8", (out_dim, in_dim)), ".scale": ("F16", (out_dim, in_dim // cls.group))}

    @classmethod
    def quantize(cls, w: np.ndarray) -> dict:
        out_dim, in_dim = w.shape
        g = cls.group
        q = np.empty((out_dim, in_dim), np.int8)
        scale = np.empty((out_dim, in_dim // g), np.float16)
        for r0 in range(0, out_dim, _CHUNK_ROWS):
            blk = np.asarray(w[r0:r0 + _CHUNK_ROWS], dtype=np.float32).reshape(-1, in_dim // g, g)
            s = (np.abs(blk).max(axis=2) / 127.0).astype(np.float16)
            # Quantize with the scale as stored (fp16-rounded), not the exact one.
            s32 = s.astype(np.float32)
            inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 > 0)
            qb = np.clip(np.rint(blk * inv[:, :, None]), -127, 127)
            q[r0:r0 + _CHUNK_ROWS] = qb.reshape(-1, in_dim).astype(np.int8)
            scale[r0:r0 + _CHUNK_ROWS] = s
        return {"": q, ".scale": scale}

    @classmethod
    def dequantize(cls, parts: dict) -> np.ndarray:
        q = np.asarray(parts[""])
        s = np.asarray(parts[".scale"]).astype(np.float32)
        out_dim, in_dim = q.shape
        return (q.reshape(out_dim, -1, cls.group).astype(np.float32) * s[:, :, None]).reshape(out_dim, in_dim)


class Int4:
    """Asymmetric 4-bit, fp16 scale and min per 32 weights of a row (5 bits/weight)."""

    name = "int4"
    suffixes = ("", ".scale", ".min")
    group = 32
    bits_per_weight = 4 + 32 / 32

    @classmethod
    def parts(cls, shape: tuple) -> dict:
        out_dim, in_dim = shape
        groups = (out_dim, in_dim // cls.group)
        return {"": ("U8", (out_dim, in_dim // 2)), ".scale": ("F16", groups), ".min": ("F16", groups)}

    # Least-squares refits of (scale, min) after the first min/max grid.
    refits = 2

    @staticmethod
    def _grid(blk, s, m):
        """Round blk (n, groups, 32) to the grid q*s+m with s, m stored as fp16.

        Returns (q, s16, m16, squared error per group)."""
        s16, m16 = np.maximum(s, 0).astype(np.float16), m.astype(np.float16)
        s32, m32 = s16.astype(np.float32), m16.astype(np.float32)
        inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 > 0)
        q = np.clip(np.rint((blk - m32[:, :, None]) * inv[:, :, None]), 0, 15)
        err = np.square(q * s32[:, :, None] + m32[:, :, None] - blk).sum(axis=2)
        return q, s16, m16, err

    @classmethod
    def quantize(cls, w: np.ndarray) -> dict:
        """Min/max grid, then `refits` rounds of least squares: with the levels q
        fixed, the (scale, min) minimising the group's squared error has a closed
        form; re-rounding to it lowers the error most where a few outliers
        stretch the min/max range. A refit is kept only where it helps."""
        out_dim, in_dim = w.shape
        g = cls.group
        packed = np.empty((out_dim, in_dim // 2), np.uint8)
        scale = np.empty((out_dim, in_dim // g), np.float16)
        minimum = np.empty((out_dim, in_dim // g), np.float16)
        for r0 in range(0, out_dim, _CHUNK_ROWS):
            blk = np.asarray(w[r0:r0 + _CHUNK_ROWS], dtype=np.float32).reshape(-1, in_dim // g, g)
            lo = blk.min(axis=2)
            hi = blk.max(axis=2)
            m16 = lo.astype(np.float16)
            q, s16, m16, err = cls._grid(blk, (hi - m16.astype(np.float32)) / 15.0, m16.astype(np.float32))
            for _ in range(cls.refits):
                sq, sqq = q.sum(axis=2), np.square(q).sum(axis=2)
                sw, sqw = blk.sum(axis=2), (q * blk).sum(axis=2)
                det = g * sqq - sq * sq
                ok = det > 0
                safe = np.where(ok, det, 1.0)
                s_fit = (g * sqw - sq * sw) / safe
                m_fit = (sw - s_fit * sq) / g
                q2, s2, m2, err2 = cls._grid(blk, s_fit, m_fit)
                better = ok & (s_fit > 0) & (err2 < err)
                q = np.where(better[:, :, None], q2, q)
                s16, m16, err = np.where(better, s2, s16), np.where(better, m2, m16), np.where(better, err2, err)
            qb = q.astype(np.uint8)
            half = g // 2
            pk = qb[:, :, :half] | (qb[:, :, half:] << 4)
            packed[r0:r0 + _CHUNK_ROWS] = pk.reshape(-1, in_dim // 2)
            scale[r0:r0 + _CHUNK_ROWS] = s16
            minimum[r0:r0 + _CHUNK_ROWS] = m16
        return {"": packed, ".scale": scale, ".min": minimum}

    @classmethod
    def dequantize(cls, parts: dict) -> np.ndarray:
        packed = np.asarray(parts[""])
        s = np.asarray(parts[".scale"]).astype(np.float32)
        m = np.asarray(parts[".min"]).astype(np.float32)
        out_dim = packed.shape[0]
        half = cls.group // 2
        pk = packed.reshape(out_dim, -1, half)
        q = np.concatenate([pk & 0x0F, pk >> 4], axis=2).astype(np.float32)
        return (q * s[:, :, None] + m[:, :, None]).reshape(out_dim, -1)


FORMATS = {f.name: f for f in (Fp32, Fp16, Int8, Int4)}
DTYPES = tuple(FORMATS)


def get_format(name: str):
    """The format class for a dtype name ("fp32", "fp16", "int8", "int4")."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ModelFormatError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def format_for_matrix(requested: str, shape: tuple) -> str:
    """The format a matrix of this shape is stored in when `requested` is asked for.

    Quantized formats need the input width to be a multiple of their group;
    a matrix whose width is not falls back to fp16 (never silently to a
    coarser format).
    """
    fmt = get_format(requested)
    if fmt.group > 1 and shape[-1] % fmt.group:
        return "fp16"
    return requested


def detect_stored_format(dtypes_by_suffix: dict) -> str:
    """Which format a stored matrix uses, from the safetensors dtypes of its parts.

    Args:
        dtypes_by_suffix: {"" : "F32"|"F16"|"I8"|"U8", ".scale": ..., ".min": ...}
    """
    main = dtypes_by_suffix.get("")
    if main == "F32":
        return "fp32"
    if main == "F16":
        return "fp16"
    if main == "I8" and ".scale" in dtypes_by_suffix:
        return "int8"
    if main == "U8" and ".scale" in dtypes_by_suffix and ".min" in dtypes_by_suffix:
        return "int4"
    raise ModelFormatError(f"unrecognised matrix storage {dtypes_by_suffix}")
