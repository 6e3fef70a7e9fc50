"""The products on weight matrices: the one place a product picks its kernel.

A matrix is one immutable container per storage format, built and computed on
by its format class (rwkvcpu/formats.py); this module decides, per call, how:

    matmul(m, X, out)            out = X @ W.T for a block of T tokens (T = 1 when decoding): the
                                 format's kernel, serial or parallel by the amount of work, or
                                 `gemm` for large fp32/fp16 matrices when T > 1
    gemm(m, X, out)              out = X @ W.T with BLAS, dequantized tiles split over threads
    matvec(m, x, out)            out = W @ x: matmul of one token
    dequantize_rows(m, r0, out)  out = W[r0:r0 + rows] as float32 (the embedding lookup)
    dequantize(m), nbytes(m), from_parts(fmt, parts), format_of(m)

Example:
    >>> m = from_parts("fp32", {"": np.eye(4, dtype=np.float32)})
    >>> out = np.empty(4, np.float32)
    >>> matvec(m, np.arange(4, dtype=np.float32), out)
"""

from __future__ import annotations

import threading

import numpy as np

from . import threads
from .formats import FORMAT_OF, get_format


def from_parts(fmt: str, parts: dict):
    """Build a matrix container from its stored tensors.

    Args:
        fmt: "fp32", "fp16", "int8" or "int4".
        parts: {suffix: array} as the format stores them ("", ".scale", ".min").

    Returns:
        the format's container (F32Matrix, F16Matrix, Int8Matrix or Int4Matrix;
        arrays made C-contiguous, no copy when they already are).

    Raises:
        ModelFormatError: an unknown format, or scales or mins whose shape does not fit the values.
    """
    return get_format(fmt).matrix(parts)


def format_of(m) -> str:
    """The format name of a matrix container ("int8", ...)."""
    return FORMAT_OF[type(m)].name


def nbytes(m) -> int:
    """Bytes read from memory by one pass over the matrix."""
    return sum(a.nbytes for a in m)


# Matrices whose values (not counting scales) are smaller than this run their
# kernel on the calling thread: waking the thread team costs a few
# microseconds, as long as streaming ~100 KB.
_PARALLEL_MIN_BYTES = 1 << 17

# fp32/fp16 matrices at least this large take BLAS for a block of tokens (a
# dequantized tile at a time); smaller ones, like the low-rank matrices, and
# every int8/int4 matrix use the engine's own kernels for any block.
_BLAS_MIN_BYTES = 1 << 20


def matmul(m, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = X @ W.T for a block of T tokens; T = 1 is a matrix-vector product.

    Every int8/int4 matrix, and fp32/fp16 matrices under 1 MB, use the
    engine's kernel for their format (kernels/matmul.py, kernels/qmatmul.py) whatever T is: row t
    of the result is, to the bit, what token t alone gives, whichever tokens
    share the block. (int8/int4 kernels round each row of X to int8 per
    weight group first.) Larger fp32/fp16 matrices take one BLAS GEMM for
    T > 1 (`gemm`), which sums in another order: float32 rounding apart.

    Args:
        m: a matrix container (F32Matrix, F16Matrix, Int8Matrix, Int4Matrix) of shape (n, k).
        X: (T, k) float32, C-contiguous.
        out: (T, n) float32, C-contiguous, written.

    Returns:
        out.

    Example:
        >>> out = matmul(m, X, np.empty((X.shape[0], m.shape[0]), np.float32))
    """
    fmt = FORMAT_OF[type(m)]
    size = m[0].nbytes
    if fmt.blas and X.shape[0] > 1 and size >= _BLAS_MIN_BYTES:
        return gemm(m, X, out)
    # Serial and parallel variants give the same bits (tests/test_kernels_matmul.py),
    # so the choice follows the amount of work only.
    fmt.matmul(m, X, out, X.shape[0] * size >= _PARALLEL_MIN_BYTES and threads.current() > 1)
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
    FORMAT_OF[type(m)].dequantize_rows(m, r0, out, out.nbytes >= _PARALLEL_MIN_BYTES and threads.current() > 1)
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


class _Tiles(threading.local):
    """Per GEMM worker thread: the float32 tile it dequantizes into."""

    def __init__(self):
        self.buf = np.empty(0, np.float32)

    def get(self, rows: int, cols: int) -> np.ndarray:
        if self.buf.size < rows * cols:
            self.buf = np.empty(rows * cols, np.float32)
        return self.buf[:rows * cols].reshape(rows, cols)


_tiles = _Tiles()


def _gemm_rows(m, X, out, r0, r1):
    """out[:, r0:r1] = X @ W[r0:r1].T, dequantizing a tile of rows at a time."""
    fmt = FORMAT_OF[type(m)]
    if fmt.name == "fp32":
        np.matmul(X, m.w[r0:r1].T, out=out[:, r0:r1])
        return
    k = m.shape[1]
    step = max(8, _TILE_BYTES // (4 * k))
    tile = _tiles.get(min(step, r1 - r0), k)
    for t0 in range(r0, r1, step):
        rows = min(step, r1 - t0)
        # Serial: each GEMM worker dequantizes its own tiles (nogil kernels).
        fmt.dequantize_rows(m, t0, tile[:rows], False)
        np.matmul(X, tile[:rows].T, out=out[:, t0:t0 + rows])


def gemm(m, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = X @ W.T with BLAS: one GEMM per matrix.

    The output columns (rows of W) are split into one contiguous block per
    thread (rwkvcpu.threads.gemm_threads()); each thread dequantizes its block
    a tile at a time into float32 and multiplies it with BLAS on that thread.
    For any format; `matmul` uses it for large fp32/fp16 matrices.

    Args:
        m: a matrix container of shape (n, k).
        X: (T, k) float32.
        out: (T, n) float32, written.

    Returns:
        out.
    """
    n, k = m.shape
    parts = 1 if X.shape[0] * n * k < _SPLIT_MIN_MACS else max(1, min(threads.gemm_threads(), n // 16))
    # Block edges on multiples of 16 rows keep each block's columns aligned.
    edges = [min(n, (n * p // parts + 15) // 16 * 16) for p in range(parts)] + [n]
    threads.parallel_for(lambda p: _gemm_rows(m, X, out, edges[p], edges[p + 1]), parts)
    return out
