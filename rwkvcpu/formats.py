"""Storage formats of weight matrices: one class per format, in a registry (FORMATS).

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

Each class says everything about its format (llama.cpp's gguf-py `quants.py` pattern):

    stored, part_shapes(shape)     the tensors a matrix is stored as: suffix -> dtype, shape
    quantize(w), dequantize(parts) float32 <-> those tensors, in numpy: the format's ground truth
    Matrix, matrix(parts)          the engine's container: one immutable object (values + scales)
    matmul(m, X, out, parallel)    the engine's product kernel, chosen here in Python
    dequantize_rows(m, r0, out, parallel)
    blas                           large matrices take BLAS for a block of tokens (rwkvcpu/matrix.py)

The converter (quant/), the loader's checks (io.py) and the products
(matrix.py) read all of it from here, so a new format is one new class (and
its kernels in kernels/). The numba kernels are imported by the first
product, so the converter never loads numba.

Example:
    >>> parts = Int8.quantize(np.ones((4, 128), np.float32))    # {"": int8 q, ".scale": fp16 scales}
    >>> m = Int8.matrix(parts)
    >>> out = np.empty((1, 4), np.float32)
    >>> Int8.matmul(m, np.ones((1, 128), np.float32), out, parallel=False)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .errors import ModelFormatError

# Rows quantized at a time: bounds the float32 temporaries to a few MB per chunk.
_CHUNK_ROWS = 1024

# numpy types of the safetensors dtypes our matrices are stored in.
STORED_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}


@functools.cache
def _kernels():
    """rwkvcpu/kernels/matmul.py, imported on the first product (it loads numba)."""
    from .kernels import matmul
    return matmul


@functools.cache
def _quantized():
    """rwkvcpu/kernels/qmatmul.py (int8/int4 on int8 activations), imported on the first product."""
    from .kernels import qmatmul
    return qmatmul


def _u16(a):
    """fp16 data as its uint16 bit patterns: the kernels read half floats as bits."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype == np.float16 else a


class Format:
    """What every storage format declares; the subclasses below fill it in.

    Attributes:
        name: the dtype name users give (`rwkvcpu convert --dtype`, `load(dtype=)`).
        group: weights per scale along a row (1: no scales).
        bits_per_weight: stored bits per weight, scales included.
        scheme: one line describing the format, recorded in converted files' metadata.
        stored: suffix -> safetensors dtype of each stored tensor; "" (the values) first.
        Matrix: the engine's container type (a NamedTuple of arrays).
        blas: fp32/fp16: matrices of 1 MB and more take BLAS for a block of tokens.
    """

    name = ""
    group = 1
    bits_per_weight = 0.0
    scheme = ""
    stored: dict = {}
    Matrix: type = tuple
    blas = False

    @classmethod
    def part_shapes(cls, shape: tuple) -> dict:
        """suffix -> shape of each stored tensor of an (out, in) matrix (in % group == 0)."""
        out_dim, in_dim = shape
        return {sfx: (out_dim, in_dim // cls.group) if sfx else (out_dim, in_dim) for sfx in cls.stored}

    @classmethod
    def parts(cls, shape: tuple) -> dict:
        """The stored tensors of an (out, in) matrix: {suffix: (safetensors dtype, shape)}."""
        return {sfx: (cls.stored[sfx], s) for sfx, s in cls.part_shapes(tuple(shape)).items()}

    @classmethod
    def matrix(cls, parts: dict):
        """The engine's container for a matrix's stored tensors (no copy when they are
        C-contiguous; fp16 data as uint16 bits).

        Raises:
            ModelFormatError: scales or mins whose shape or dtype does not fit the values.
        """
        m = cls.Matrix(*(_u16(parts[sfx]) for sfx in cls.stored))
        n, width = m.shape
        for sfx, a in zip(tuple(cls.stored)[1:], m[1:]):
            if a.shape != (n, width // cls.group) or width % cls.group or a.dtype != np.uint16:
                raise ModelFormatError(
                    f"{cls.name} matrix of shape {(n, width)}: its {sfx} has shape {a.shape} and dtype "
                    f"{a.dtype}, expected {(n, width // cls.group)} float16 (one per {cls.group} weights of a row)")
        return m

    @classmethod
    def matches(cls, parts: dict) -> bool:
        """Whether stored tensors {suffix: array} are in this format (by their dtypes)."""
        return all(sfx in parts and np.asarray(parts[sfx]).dtype == STORED_DTYPES[dt]
                   for sfx, dt in cls.stored.items())


# ----------------------------------------------------------------------- fp32


class F32Matrix(NamedTuple):
    w: np.ndarray          # (out, in) f32

    @property
    def shape(self):
        return self.w.shape


class Fp32(Format):
    name = "fp32"
    bits_per_weight = 32.0
    scheme = "fp32: matrices float32"
    stored = {"": "F32"}
    Matrix = F32Matrix
    blas = True

    @classmethod
    def matrix(cls, parts):
        return F32Matrix(np.ascontiguousarray(parts[""], dtype=np.float32))

    @staticmethod
    def quantize(w: np.ndarray) -> dict:
        """w: (out, in) float32 -> {suffix: array}."""
        return {"": np.ascontiguousarray(w, dtype=np.float32)}

    @staticmethod
    def dequantize(parts: dict) -> np.ndarray:
        return np.asarray(parts[""], dtype=np.float32)

    @staticmethod
    def matmul(m, X, out, parallel):
        """out = X @ W.T.   X: (T, in) f32, out: (T, out) f32"""
        K = _kernels()
        (K.matmul_f32 if parallel else K.matmul_f32_serial)(m.w, X, out)

    @staticmethod
    def dequantize_rows(m, r0, out, parallel):
        out[:] = m.w[r0:r0 + out.shape[0]]


# ----------------------------------------------------------------------- fp16


class F16Matrix(NamedTuple):
    w: np.ndarray          # (out, in) u16, fp16 bits

    @property
    def shape(self):
        return self.w.shape


class Fp16(Format):
    name = "fp16"
    bits_per_weight = 16.0
    scheme = "fp16: matrices float16"
    stored = {"": "F16"}
    Matrix = F16Matrix
    blas = True

    @staticmethod
    def quantize(w: np.ndarray) -> dict:
        return {"": np.asarray(w, dtype=np.float32).astype(np.float16)}

    @staticmethod
    def dequantize(parts: dict) -> np.ndarray:
        return np.asarray(parts[""]).astype(np.float32)

    @staticmethod
    def matmul(m, X, out, parallel):
        K = _kernels()
        (K.matmul_f16 if parallel else K.matmul_f16_serial)(m.w, X, out)

    @staticmethod
    def dequantize_rows(m, r0, out, parallel):
        K = _kernels()
        (K.dequantize_rows_f16 if parallel else K.dequantize_rows_f16_serial)(m.w, r0, out)


# ----------------------------------------------------------------------- int8


class Int8Matrix(NamedTuple):
    q: np.ndarray          # (out, in) i8
    scale: np.ndarray      # (out, in/64) u16, fp16 bits

    @property
    def shape(self):
        return self.q.shape


class Int8(Format):
    """Symmetric 8-bit, one fp16 scale per 64 weights of a row (8.25 bits/weight)."""

    name = "int8"
    group = 64
    bits_per_weight = 8 + 16 / 64
    scheme = ("int8: symmetric, groups of 64 along each row, fp16 scales; "
              "matrices whose input width is not a multiple of 64 are fp16")
    stored = {"": "I8", ".scale": "F16"}
    Matrix = Int8Matrix

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

    @staticmethod
    def matmul(m, X, out, parallel):
        """out = X @ W.T, each row of X rounded to int8 per group first (kernels/qmatmul.py)."""
        _quantized().matmul_int8(m.q, m.scale, X, out, parallel)

    @staticmethod
    def dequantize_rows(m, r0, out, parallel):
        K = _kernels()
        (K.dequantize_rows_i8 if parallel else K.dequantize_rows_i8_serial)(m.q, m.scale, r0, out)


# ----------------------------------------------------------------------- int4


class Int4Matrix(NamedTuple):
    q: np.ndarray          # (out, in/2) u8
    scale: np.ndarray      # (out, in/32) u16, fp16 bits
    min: np.ndarray        # (out, in/32) u16, fp16 bits

    @property
    def shape(self):
        return (self.q.shape[0], self.q.shape[1] * 2)


class Int4(Format):
    """Asymmetric 4-bit, fp16 scale and min per 32 weights of a row (5 bits/weight)."""

    name = "int4"
    group = 32
    bits_per_weight = 4 + 32 / 32
    scheme = ("int4: asymmetric (scale, min), groups of 32 along each row, fp16 scale and min; "
              "matrices whose input width is not a multiple of 32 are fp16")
    stored = {"": "U8", ".scale": "F16", ".min": "F16"}
    Matrix = Int4Matrix

    @classmethod
    def part_shapes(cls, shape: tuple) -> dict:
        out_dim, in_dim = shape
        groups = (out_dim, in_dim // cls.group)
        return {"": (out_dim, in_dim // 2), ".scale": groups, ".min": groups}

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

    @staticmethod
    def matmul(m, X, out, parallel):
        """out = X @ W.T, each row of X rounded to int8 per group first (kernels/qmatmul.py)."""
        _quantized().matmul_int4(m.q, m.scale, m.min, X, out, parallel)

    @staticmethod
    def dequantize_rows(m, r0, out, parallel):
        K = _kernels()
        (K.dequantize_rows_i4 if parallel else K.dequantize_rows_i4_serial)(m.q, m.scale, m.min, r0, out)


# ------------------------------------------------------------------- registry

FORMATS = {f.name: f for f in (Fp32, Fp16, Int8, Int4)}
DTYPES = tuple(FORMATS)
# Every suffix a stored matrix's tensors may have ("", ".scale", ".min").
SUFFIXES = tuple(dict.fromkeys(sfx for f in FORMATS.values() for sfx in f.stored))
# The engine's container type -> its format.
FORMAT_OF = {f.Matrix: f for f in FORMATS.values()}


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


def detect_stored_format(parts: dict):
    """Which format a stored matrix uses, from the dtypes of its tensors.

    Args:
        parts: {suffix: array} ("" the values, ".scale", ".min").

    Returns:
        the format class whose tensors all are there with their dtypes (extra
        tensors are left for the caller to refuse).

    Raises:
        ModelFormatError: no format stores a matrix like this.
    """
    for fmt in FORMATS.values():
        if fmt.matches(parts):
            return fmt
    found = ", ".join(f"{sfx or 'values'} {np.asarray(a).dtype}" for sfx, a in parts.items())
    known = "; ".join(f"{f.name}: " + ", ".join(f"{sfx or 'values'} {dt}" for sfx, dt in f.stored.items())
                      for f in FORMATS.values())
    raise ModelFormatError(f"a matrix stored as {found} is in no format rwkvcpu knows ({known})")
