"""Weight matrices as single objects (values + scales), and the products on them.

A matrix is one immutable container per storage format (see quant/formats.py
for the layouts). `matmul` (a block of T tokens; T = 1 when generating) picks
the kernel in Python from the container's type (KERNELS), so compiled code
never branches on the format.

    matmul(m, X, out)            out = X @ W.T for T tokens   numba kernels (kernels/matvec.py), T = 1 too
    matvec(m, x, out)            out = W @ x                  matmul of one token
    gemm(m, X, out)              out = X @ W.T                dequantized tiles + BLAS, split over threads
    dequantize_rows(m, r0, out)  out = W[r0:r0 + rows]        float32
    dequantize(m), nbytes(m), from_parts(fmt, parts), format_of(m)

Example:
    >>> m = from_parts("fp32", {"": np.eye(4, dtype=np.float32)})
    >>> out = np.empty(4, np.float32)
    >>> matvec(m, np.arange(4, dtype=np.float32), out)
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from . import threads
from .errors import ModelFormatError
from .kernels import matvec as K
from .quant.formats import FORMATS

# Weights per scale (and min) along a row, as the formats define them.
_INT8_GROUP = FORMATS["int8"].group
_INT4_GROUP = FORMATS["int4"].group


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
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _check(fmt, m):
    """The scale/min arrays (the fields after the values) must have one entry per group of each row."""
    group = FORMATS[fmt].group
    for a in m[1:]:
        n, width = m.shape
        if a.shape != (n, width // group) or width % group or a.dtype != np.uint16:
            raise ModelFormatError(
                f"{fmt} matrix of shape {(n, width)}: its scales/mins have shape {a.shape} and dtype "
                f"{a.dtype}, expected {(n, width // group)} float16 (one per {group} weights of a row)")


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


# format name -> (container, how each of its fields is read: (stored part suffix, reader)).
_CONTAINERS = {
    "fp32": (F32Matrix, (("", _f32),)),
    "fp16": (F16Matrix, (("", _u16),)),
    "int8": (Int8Matrix, (("", np.ascontiguousarray), (".scale", _u16))),
    "int4": (Int4Matrix, (("", np.ascontiguousarray), (".scale", _u16), (".min", _u16))),
}


def from_parts(fmt: str, parts: dict):
    """Build a matrix container from its stored tensors.

    Args:
        fmt: "fp32", "fp16", "int8" or "int4".
        parts: {suffix: array} as written by quant/formats.py ("", ".scale", ".min").

    Returns:
        F32Matrix, F16Matrix, Int8Matrix or Int4Matrix (arrays made C-contiguous; no copy
        when they already are).

    Raises:
        ModelFormatError: an unknown format, or scales or mins whose shape does not fit the values.
    """
    try:
        container, fields = _CONTAINERS[fmt]
    except KeyError:
        raise ModelFormatError(f"unknown matrix format {fmt!r}") from None
    m = container(*(read(parts[suffix]) for suffix, read in fields))
    _check(fmt, m)
    return m


def format_of(m) -> str:
    return _FORMAT_NAMES[type(m)]


_FORMAT_NAMES = {container: fmt for fmt, (container, _) in _CONTAINERS.items()}


def nbytes(m) -> int:
    """Bytes read from memory by one pass over the matrix."""
    return sum(a.nbytes for a in m)


# Matrices whose values (not counting scales) are smaller than this run their
# kernel on the calling thread: waking the thread team costs a few
# microseconds, as long as streaming ~100 KB.
_PARALLEL_MIN_BYTES = 1 << 17

# fp32/fp16 matrices at least this large take BLAS for a block of tokens (a
# dequantized tile at a time); smaller ones, like the low-rank matrices, and
# every int8/int4 matrix use the engine's own kernels on both paths.
_BLAS_MIN_BYTES = 1 << 20

# Entries kept per activation table (prompts of many lengths: keep it bounded).
_MAX_ACTIVATION_SHAPES = 64


class _Scratch(threading.local):
    """Per calling thread: the int16 activations of the quantized kernels by (tokens,
    input width), one table per format (int8 and int4 groups differ); the float32
    tile a GEMM worker dequantizes into; the BLAS path's partial sums."""

    def __init__(self):
        self.int8 = {}
        self.int4 = {}
        self.tile = np.empty(0, np.float32)
        self.partial = np.empty(0, np.float32)

    def activations(self, table: dict, T: int, k: int, group: int):
        bufs = table.get((T, k))
        if bufs is None:
            if len(table) >= _MAX_ACTIVATION_SHAPES:
                table.clear()
            bufs = table[T, k] = (np.empty((T, k), np.int16), np.empty((T, k // group), np.float32),
                                  np.empty((T, k // group), np.float32))
        return bufs

    def floats(self, name: str, rows: int, cols: int) -> np.ndarray:
        buf = getattr(self, name)
        if buf.size < rows * cols:
            buf = np.empty(rows * cols, np.float32)
            setattr(self, name, buf)
        return buf[:rows * cols].reshape(rows, cols)


_scratch = _Scratch()


def _matmul_f32(m, X, out, accumulate, parallel):
    (K.matmul_f32 if parallel else K.matmul_f32_serial)(m.w, X, out, accumulate)


def _matmul_f16(m, X, out, accumulate, parallel):
    (K.matmul_f16 if parallel else K.matmul_f16_serial)(m.w, X, out, accumulate)


def _matmul_i8(m, X, out, accumulate, parallel):
    xq, xs, xsum = _scratch.activations(_scratch.int8, X.shape[0], X.shape[1], _INT8_GROUP)
    (K.matmul_i8 if parallel else K.matmul_i8_serial)(m.q, m.scale, X, xq, xs, xsum, out, accumulate)


def _matmul_i4(m, X, out, accumulate, parallel):
    xq, xs, xsum = _scratch.activations(_scratch.int4, X.shape[0], X.shape[1], _INT4_GROUP)
    (K.matmul_i4 if parallel else K.matmul_i4_serial)(m.q, m.scale, m.min, X, xq, xs, xsum, out, accumulate)


def _dequantize_f32(m, r0, out, parallel):
    out[:] = m.w[r0:r0 + out.shape[0]]


def _dequantize_f16(m, r0, out, parallel):
    (K.dequantize_rows_f16 if parallel else K.dequantize_rows_f16_serial)(m.w, r0, out)


def _dequantize_i8(m, r0, out, parallel):
    (K.dequantize_rows_i8 if parallel else K.dequantize_rows_i8_serial)(m.q, m.scale, r0, out)


def _dequantize_i4(m, r0, out, parallel):
    (K.dequantize_rows_i4 if parallel else K.dequantize_rows_i4_serial)(m.q, m.scale, m.min, r0, out)


class Kernels(NamedTuple):
    matmul: object              # (m, X, out, accumulate, parallel): the engine's own kernel
    dequantize_rows: object     # (m, r0, out, parallel)
    blas: bool                  # large matrices take BLAS for several tokens


# The one place that maps a storage format to its kernels.
KERNELS = {
    F32Matrix: Kernels(_matmul_f32, _dequantize_f32, True),
    F16Matrix: Kernels(_matmul_f16, _dequantize_f16, True),
    Int8Matrix: Kernels(_matmul_i8, _dequantize_i8, False),
    Int4Matrix: Kernels(_matmul_i4, _dequantize_i4, False),
}


def matmul(m, X: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out = X @ W.T (or out += X @ W.T) for a block of T tokens; T = 1 is a matrix-vector product.

    Every int8/int4 matrix, and fp32/fp16 matrices under 1 MB, use the engine's
    kernel for its format (kernels/matvec.py) whatever T is, so one token at a
    time and a block of tokens give the same numbers to the bit. (int8/int4
    kernels round each row of X to int16 per weight group first.) Larger
    fp32/fp16 matrices take one BLAS GEMM for T > 1 (`gemm`), which sums in
    another order: the two paths then differ by float32 rounding.

    Args:
        m: a matrix container (F32Matrix, F16Matrix, Int8Matrix, Int4Matrix) of shape (n, k).
        X: (T, k) float32, C-contiguous.
        out: (T, n) float32, C-contiguous, written (or added to).
        accumulate: add the product to out instead of storing it.

    Returns:
        out.

    Example:
        >>> out = matmul(m, X, np.empty((X.shape[0], m.shape[0]), np.float32))
    """
    kern = KERNELS[type(m)]
    size = m[0].nbytes
    if kern.blas and X.shape[0] > 1 and size >= _BLAS_MIN_BYTES:
        return gemm(m, X, out, accumulate)
    # Serial and parallel variants give the same bits (tests/test_kernels_matvec.py),
    # so the choice follows the amount of work only.
    kern.matmul(m, X, out, accumulate, X.shape[0] * size >= _PARALLEL_MIN_BYTES)
    return out


def matvec(m, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = W @ x: matmul for one token.

    Args:
        m: a matrix container of shape (n, k).
        x: (k,) float32, C-contiguous.
        out: (n,) float32, C-contiguous, written.

    Returns:
        out.

    Example:
        >>> out = matvec(m, x, np.empty(m.shape[0], np.float32))
    """
    matmul(m, x.reshape(1, -1), out.reshape(1, -1))
    return out


def dequantize_rows(m, r0: int, out: np.ndarray) -> np.ndarray:
    """out[k, :] = W[r0 + k, :] as float32.

    Args:
        m: a matrix container of shape (n, k).
        r0: first row.
        out: (rows, k) float32, C-contiguous; rows r0 .. r0 + rows - 1 are written to it.

    Returns:
        out.
    """
    KERNELS[type(m)].dequantize_rows(m, r0, out, out.nbytes >= _PARALLEL_MIN_BYTES)
    return out


def dequantize(m) -> np.ndarray:
    """The whole matrix as float32 (out, in)."""
    out = np.empty(m.shape, np.float32)
    return dequantize_rows(m, 0, out)


# Rows of W dequantized at a time by one GEMM worker: about 1 MB of float32,
# so the tile stays in the core's L2 cache while BLAS reads it T times.
_TILE_BYTES = 1 << 20

# Below ~4M multiply-adds (0.1 ms) a second thread costs more than it saves.
_SPLIT_MIN_MACS = 1 << 22


def _gemm_rows(m, X, out, r0, r1):
    """out[:, r0:r1] = X @ W[r0:r1].T, dequantizing a tile of rows at a time."""
    if type(m) is F32Matrix:
        np.matmul(X, m.w[r0:r1].T, out=out[:, r0:r1])
        return
    k = m.shape[1]
    step = max(8, _TILE_BYTES // (4 * k))
    tile = _scratch.floats("tile", min(step, r1 - r0), k)
    dequantize = KERNELS[type(m)].dequantize_rows
    for t0 in range(r0, r1, step):
        rows = min(step, r1 - t0)
        # Serial: each GEMM worker dequantizes its own tiles (nogil kernels).
        dequantize(m, t0, tile[:rows], False)
        np.matmul(X, tile[:rows].T, out=out[:, t0:t0 + rows])


def gemm(m, X: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out = X @ W.T (or out += X @ W.T) with BLAS: one GEMM per matrix.

    The output columns (rows of W) are split into one contiguous block per
    thread (rwkvcpu.threads.gemm_threads()); each thread dequantizes its block
    a tile at a time into float32 and multiplies it with BLAS on that thread.
    For any format; `matmul` uses it for large fp32/fp16 matrices.

    Args:
        m: a matrix container of shape (n, k).
        X: (T, k) float32.
        out: (T, n) float32, written (or added to).
        accumulate: add the product to out instead of storing it.

    Returns:
        out.
    """
    n, k = m.shape
    dest = _scratch.floats("partial", X.shape[0], n) if accumulate else out
    parts = 1 if X.shape[0] * n * k < _SPLIT_MIN_MACS else max(1, min(threads.gemm_threads(), n // 16))
    # Block edges on multiples of 16 rows keep each block's columns aligned.
    edges = [min(n, (n * p // parts + 15) // 16 * 16) for p in range(parts)] + [n]
    threads.parallel_for(lambda p: _gemm_rows(m, X, dest, edges[p], edges[p + 1]), parts)
    if accumulate:
        out += dest
    return out
