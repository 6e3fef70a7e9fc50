"""Weight matrices as single objects (values + scales), and the products on them.

A matrix is one immutable container per storage format (see quant/formats.py
for the layouts). `matvec` and `matmul` pick the kernel in Python from the
container's type, so compiled code never branches on the format.

Example:
    >>> m = from_parts("fp32", {"": np.eye(4, dtype=np.float32)})
    >>> out = np.empty(4, np.float32)
    >>> matvec(m, np.arange(4, dtype=np.float32), out)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .kernels import matvec as K


class F32Matrix(NamedTuple):
    w: np.ndarray          # (out, in) f32

    @property
    def shape(self):
        return self.w.shape


class F16Matrix(NamedTuple):
    w: np.ndarray          # (out, in) u16, fp16 bits

    @property
    def shape(self):
        return self.w.shape


class Int8Matrix(NamedTuple):
    q: np.ndarray          # (out, in) i8
    scale: np.ndarray      # (out, in/64) u16, fp16 bits

    @property
    def shape(self):
        return self.q.shape


class Int4Matrix(NamedTuple):
    q: np.ndarray          # (out, in/2) u8
    scale: np.ndarray      # (out, in/32) u16, fp16 bits
    min: np.ndarray        # (out, in/32) u16, fp16 bits

    @property
    def shape(self):
        return (self.q.shape[0], self.q.shape[1] * 2)


def _u16(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == np.float16 else a


def from_parts(fmt: str, parts: dict):
    """Build a matrix container from its stored tensors.

    Args:
        fmt: "fp32", "fp16", "int8" or "int4".
        parts: {suffix: array} as written by quant/formats.py ("" , ".scale", ".min").
    """
    if fmt == "fp32":
        return F32Matrix(np.asarray(parts[""], dtype=np.float32))
    if fmt == "fp16":
        return F16Matrix(_u16(parts[""]))
    if fmt == "int8":
        return Int8Matrix(np.asarray(parts[""]), _u16(parts[".scale"]))
    if fmt == "int4":
        return Int4Matrix(np.asarray(parts[""]), _u16(parts[".scale"]), _u16(parts[".min"]))
    raise ValueError(f"unknown matrix format {fmt!r}")


def format_of(m) -> str:
    return _FORMAT_NAMES[type(m)]


_FORMAT_NAMES = {F32Matrix: "fp32", F16Matrix: "fp16", Int8Matrix: "int8", Int4Matrix: "int4"}


def nbytes(m) -> int:
    """Bytes read from memory by one pass over the matrix."""
    return sum(a.nbytes for a in m)


def matvec(m, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = W @ x.   x: (in,) f32, out: (out,) f32"""
    t = type(m)
    if t is Int8Matrix:
        K.matvec_i8(m.q, m.scale, x, out)
    elif t is Int4Matrix:
        xsums = np.empty(m.scale.shape[1], np.float32)
        K.group_sums(x, x.shape[0] // m.scale.shape[1], xsums)
        K.matvec_i4(m.q, m.scale, m.min, x, xsums, out)
    elif t is F16Matrix:
        K.matvec_f16(m.w, x, out)
    else:
        K.matvec_f32(m.w, x, out)
    return out


def dequantize_rows(m, r0: int, out: np.ndarray) -> np.ndarray:
    """out[k, :] = W[r0 + k, :] as float32.   out: (rows, in) f32"""
    t = type(m)
    if t is Int8Matrix:
        K.dequantize_rows_i8(m.q, m.scale, r0, out)
    elif t is Int4Matrix:
        K.dequantize_rows_i4(m.q, m.scale, m.min, r0, out)
    elif t is F16Matrix:
        K.dequantize_rows_f16(m.w, r0, out)
    else:
        out[:] = m.w[r0:r0 + out.shape[0]]
    return out


def dequantize(m) -> np.ndarray:
    """The whole matrix as float32 (out, in)."""
    out = np.empty(m.shape, np.float32)
    return dequantize_rows(m, 0, out)


# Rows of W dequantized at a time by matmul: a 256 x 4096 fp32 tile is 4 MB.
_TILE_ROWS = 256


def matmul(m, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = X @ W.T for T tokens at once (one GEMM per matrix).

    X: (T, in) f32, out: (T, out) f32. fp32 weights go straight to BLAS; other
    formats are dequantized a tile of rows at a time into a float32 buffer.
    """
    if type(m) is F32Matrix:
        np.matmul(X, m.w.T, out=out)
        return out
    n, k = m.shape
    tile = np.empty((min(_TILE_ROWS, n), k), np.float32)
    for r0 in range(0, n, _TILE_ROWS):
        rows = min(_TILE_ROWS, n - r0)
        t = dequantize_rows(m, r0, tile[:rows])
        np.matmul(X, t.T, out=out[:, r0:r0 + rows])
    return out
