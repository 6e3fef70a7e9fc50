"""int8 and int4 matrix products on int8 activations: out[t] = W @ X[t] for a block of T tokens.

Each row of X is first quantized to int8 per weight group (scale max|x| / 127;
`quantize_i8` / `quantize_i4`), so that a group's dot product is exact integer
arithmetic on the CPU's widest integer multiply-add (kernels/idot.py; the path
is chosen once from the CPU's features, kernels/isa.py). The rounding moves
each x[j] by at most max|x over its group| / 254.

Two layouts of the work, one result: both compute every (token, row) in the
canonical order of kernels/idot.py, so a token gives the same bits alone and
in a block, and every CPU path gives the same bits.

    rows   (T <= ROW_TOKENS)  each weight row is read once and multiplied with the
           T tokens' activations in turn; for one token (decoding), a stream of rows.
    tiles  (T > ROW_TOKENS)   the activations of 8 tokens are interleaved word by word
           (`tile_i8`), and each 4-byte word of weights is broadcast to the 8 token lanes
           of one vpdpbusd: 8 tokens for the instructions of one. A block of rows is read
           from memory once for all the tiles of a prompt.

Scratch arrays come from `Work` (per thread, reused); nothing here allocates
per call once a shape has been seen. Example:

    >>> out = np.empty((X.shape[0], q.shape[0]), np.float32)
    >>> matmul_int8(q, scale, X, out, parallel=True)
"""

from __future__ import annotations

import hashlib
import sys
import threading
import weakref
from pathlib import Path
from types import FunctionType

import numpy as np
from numba import njit, prange

from . import idot, isa
from .f16 import f16_to_f32
from .simd import prefetch, prefetch_l2

# Tokens up to which the row layout is used (see the module docstring). A tile costs the same at
# 2 tokens as at 8; reading each row once for up to 4 tokens in turn is cheaper (bench_blocks.py,
# v7-0.4b int8, 2 threads: 2 tokens 21.7 ms by rows against 38.3 by tiles, 4 tokens 33.4 against 39.1;
# int4 18.4 against 30.3, 28.8 against 31.7), so batches of 2-4 sequences gain most.
ROW_TOKENS = 4
# Tokens per tile: the lanes of one 256-bit vector of int32.
TILE = 8
# Output rows per unit of parallel work; rows per tile intrinsic call (independent chains of
# multiply-adds for the CPU to interleave).
ROWS = 16
TILE_ROWS = 4
# How far ahead of the tile kernels' reads to prefetch into L2, in rows: they read a few bytes of
# TILE_ROWS rows at a time, too short a stream for the hardware prefetcher (measured: 2x at DRAM).
PREFETCH_ROWS = 16
# How far ahead of the int4 row kernel's reads to prefetch: it computes so much per byte that the
# hardware prefetcher falls behind.
PREFETCH_BYTES = 4096
# int8 activations per word of a tile, and int8 / int4 weights per group (rwkvcpu/formats.py).
I8_GROUP = 64
I4_GROUP = 32

_UNSIGNED = np.int32(-2139062144)   # 0x80808080: + 128 on each byte of a word


# --------------------------------------------------------------- activations

@njit(nogil=True, cache=True)
def _group_absmax(X, t, j0, size):
    """(max |X[t, j0:j0 + size]|, whether every value is finite): a group's activation scale."""
    amax = np.float32(0.0)
    finite = True
    for j in range(j0, j0 + size):
        v = abs(X[t, j])
        # Not "v > max": NaN compares false. Without fastmath the test is kept.
        if not v <= np.float32(3.4028235e38):
            finite = False
        elif v > amax:
            amax = v
    return amax, finite


@njit(nogil=True, cache=True)
def _level(x, inv):
    """x's int8 level at 1 / inv per step, as a float: rint(x * inv) within [-127, 127]."""
    return min(max(np.rint(x * inv), np.float32(-127.0)), np.float32(127.0))


def _quantize_i8(X, xq, xs, xc):
    """Per token t and group g of 64: xs[t, g] = max|x| / 127, xq = rint(x / xs) in [-127, 127],
    xc[t, g] = 128 * sum(xq over the group). A group holding inf or NaN gets xs = NaN and xq = 0,
    so the products that use it come out NaN, as float products would.
    X: (T, m) f32, xq: (T, m) i8, xs, xc: (T, m/64) f32, i32"""
    T, m = X.shape
    ng = xs.shape[1]
    for t in range(T):
        for g in range(ng):
            amax, finite = _group_absmax(X, t, 64 * g, 64)
            inv = np.float32(127.0) / amax if amax > 0 and finite else np.float32(0.0)
            xs[t, g] = amax / np.float32(127.0) if finite else np.float32(np.nan)
            total = 0
            for j in range(64 * g, 64 * g + 64):
                v = _level(X[t, j], inv) if finite else 0.0
                xq[t, j] = np.int8(v)
                total += np.int32(v)
            xc[t, g] = np.int32(128) * total


@njit(cache=True)
def _i4_slot(g, i, chunked):
    """Where activation i (0-31) of int4 group g goes in the row layout: groups g < chunked (a
    multiple of 4) in runs of 4, each run 64 bytes of the low nibbles' partners (activations 0-15
    of each group, group after group) then 64 bytes of the high ones'; later groups in natural order."""
    if g < chunked:
        return 128 * (g // 4) + 64 * (i // 16) + 16 * (g % 4) + i % 16
    return 32 * g + i


def _quantize_i4(X, xq, xs, e):
    """Per token t and group g of 32: xs[t, g] = max|x| / 127, its int8 levels q = rint(x / xs)
    placed at _i4_slot, e[t, g] = xs * sum(q) (the sum the weights' mins multiply). A group
    holding inf or NaN gets xs = e = NaN and q = 0.
    X: (T, m) f32, xq: (T, m) i8, xs, e: (T, m/32) f32"""
    T, m = X.shape
    ng = xs.shape[1]
    chunked = ng // 4 * 4
    for t in range(T):
        for g in range(ng):
            amax, finite = _group_absmax(X, t, 32 * g, 32)
            inv = np.float32(127.0) / amax if amax > 0 and finite else np.float32(0.0)
            s = amax / np.float32(127.0) if finite else np.float32(np.nan)
            total = 0
            for i in range(32):
                v = _level(X[t, 32 * g + i], inv) if finite else 0.0
                xq[t, _i4_slot(g, i, chunked)] = np.int8(v)
                total += np.int32(v)
            xs[t, g] = s
            e[t, g] = s * np.float32(total)


def _tile_i8(xq, xs, unsigned, xt, sxt):
    """The tokens in tiles of 8: xt[k, g, j, l] = bytes 4j .. 4j + 3 of group g of token 8k + l as
    one int32 word (each byte + 128, as unsigned, when `unsigned`: the VNNI paths' operand), sxt[k, g, l]
    = xs[8k + l, g]; lanes past the last token hold zeros (their results are not stored).
    xq: (T, m) i8, xs: (T, m/64) f32, xt: (T/8 rounded up, m/64, 16, 8) i32, sxt: (same, m/64, 8) f32"""
    T = xq.shape[0]
    tiles, ng = sxt.shape[0], sxt.shape[1]
    words = xq.view(np.int32)
    for k in range(tiles):
        for g in range(ng):
            for l in range(TILE):
                t = TILE * k + l
                for j in range(16):
                    w = words[t, 16 * g + j] if t < T else np.int32(0)
                    xt[k, g, j, l] = w ^ _UNSIGNED if unsigned else w
                sxt[k, g, l] = xs[t, g] if t < T else np.float32(0.0)


def _tile_i4(xq, xs, e, xt, sxt, et):
    """The tokens in tiles of 8: xt[k, g, w, l] = activations 4w .. 4w + 3 of group g (natural order)
    of token 8k + l as one int32 word; sxt, et[k, g, l] = xs, e[8k + l, g]; zeros past the last token.
    xq: (T, m) i8 (row layout, see _quantize_i4), xs, e: (T, m/32) f32, xt: (tiles, m/32, 8, 8) i32,
    sxt, et: (tiles, m/32, 8) f32"""
    T = xq.shape[0]
    tiles, ng = sxt.shape[0], sxt.shape[1]
    chunked = ng // 4 * 4
    for k in range(tiles):
        for g in range(ng):
            for l in range(TILE):
                t = TILE * k + l
                for w in range(8):
                    word = np.int32(0)
                    if t < T:
                        for b in range(4):
                            word |= (np.int32(xq[t, _i4_slot(g, 4 * w + b, chunked)]) & 255) << (8 * b)
                    xt[k, g, w, l] = word
                sxt[k, g, l] = xs[t, g] if t < T else np.float32(0.0)
                et[k, g, l] = e[t, g] if t < T else np.float32(0.0)


def _negated_sums_i8(q, nw):
    """nw[i, g] = -128 * (sum of group g of row i): takes back the + 128 of the tiles' unsigned
    activations.   q: (n, m) i8, nw: (n, m/64) i32"""
    n, m = q.shape
    ng = nw.shape[1]
    for i in prange(n):
        for g in range(ng):
            s = np.int32(0)
            for j in range(64 * g, 64 * g + 64):
                s += np.int32(q[i, j])
            nw[i, g] = np.int32(-128) * s


# ------------------------------------------------------------------ kernels
# Written once; _specialize binds the intrinsics of one CPU path (i8_row, i8_tile, ...). Groups go
# 16 at a time (a literal: straight-line code), then up to 4 (a runtime count the intrinsic
# branches on).

def _rows_i8(q, scale, X, xq, xs, xc, out):
    """out[t, i] = sum over groups g (canonical order, kernels/idot.py) of
    f32(q[i, g] . xq[t, g]) * scale[i, g] * xs[t, g], X's rows quantized first (into xq, xs, xc).
    q: (n, m) i8, scale: (n, m/64) u16 (fp16 bits), X: (T, m) f32, xq: (T, m) i8, xs: (T, m/64) f32,
    xc: (T, m/64) i32, out: (T, n) f32"""
    quantize_i8(X, xq, xs, xc)
    n, m = q.shape
    T, ng = xs.shape
    for i in prange(n):
        for t in range(T):
            acc = np.float32(0.0)
            g = 0
            while g + 16 <= ng:
                acc = i8_row(acc, q, i * m + 64 * g, xq, t * m + 64 * g, xc, xs, t * ng + g, scale, i * ng + g, 16)
                g += 16
            while g < ng:
                acc = i8_row(acc, q, i * m + 64 * g, xq, t * m + 64 * g, xc, xs, t * ng + g, scale, i * ng + g,
                             min(4, ng - g))
                g += 4
            out[t, i] = acc


def _rows_i4(q, scale, minimum, X, xq, xs, e, out):
    """out[t, i] = sum over groups g (canonical order) of
    f32(q[i, g] . xq[t, g]) * scale[i, g] * xs[t, g] + min[i, g] * e[t, g], X's rows quantized first.
    q: (n, m/2) u8, scale, minimum: (n, m/32) u16 (fp16 bits), X: (T, m) f32, xq: (T, m) i8 (row layout,
    _quantize_i4), xs, e: (T, m/32) f32, out: (T, n) f32"""
    quantize_i4(X, xq, xs, e)
    n, half = q.shape
    T, ng = xs.shape
    m = 2 * half
    for i in prange(n):
        for t in range(T):
            acc = np.float32(0.0)
            g = 0
            while g + 16 <= ng:
                if t == 0:
                    for k in range(4):
                        prefetch(q, i * half + 16 * g + PREFETCH_BYTES + 64 * k)
                acc = i4_row(acc, q, i * half + 16 * g, xq, t * m + 32 * g, xs, e, t * ng + g, scale, minimum,
                             i * ng + g, 16)
                g += 16
            while g < ng:
                acc = i4_row(acc, q, i * half + 16 * g, xq, t * m + 32 * g, xs, e, t * ng + g, scale, minimum,
                             i * ng + g, min(4, ng - g))
                g += 4
            out[t, i] = acc


def _tiles_i8(q, scale, nw, X, xq, xs, xc, unsigned, xt, sxt, out):
    """out[t, i] for every token, the tiles' way (the same numbers as _rows_i8): X's rows quantized
    and laid out in tiles first (into xq, xs, xc, then xt, sxt; `unsigned`: see _tile_i8).
    q: (n, m) i8, scale: (n, m/64) u16, nw: (n, m/64) i32 (_negated_sums_i8), X: (T, m) f32,
    xt: (tiles, m/64, 16, 8) i32, sxt: (tiles, m/64, 8) f32, out: (T, n) f32"""
    quantize_i8(X, xq, xs, xc)
    tile_i8(xq, xs, unsigned, xt, sxt)
    n, m = q.shape
    T = out.shape[0]
    ng = scale.shape[1]
    for b in prange((n + ROWS - 1) // ROWS):
        acc = np.empty((TILE_ROWS, TILE), np.float32)
        for i in range(b * ROWS, min(n, b * ROWS + ROWS), TILE_ROWS):
            rows = min(TILE_ROWS, n - i)
            _prefetch_rows(q, (i + PREFETCH_ROWS) * m, TILE_ROWS * m)
            for k in range(xt.shape[0]):
                acc[:] = 0.0
                for g in range(0, ng, 4):
                    if rows == TILE_ROWS:
                        i8_tile(acc, q, i * m + 64 * g, nw, i * ng + g, xt, (k * ng + g) * 128, sxt, (k * ng + g) * 8,
                                scale, i * ng + g, ng, min(4, ng - g), TILE_ROWS)
                    else:
                        for r in range(rows):
                            i8_tile(acc[r:], q, (i + r) * m + 64 * g, nw, (i + r) * ng + g, xt, (k * ng + g) * 128,
                                    sxt, (k * ng + g) * 8, scale, (i + r) * ng + g, ng, min(4, ng - g), 1)
                _store_tile(acc, k, i, rows, out)


def _tiles_i4(q, scale, minimum, X, xq, xs, e, xt, sxt, et, out):
    """out[t, i] for every token, the tiles' way (the same numbers as _rows_i4): X's rows quantized
    and laid out in tiles first. q: (n, m/2) u8, scale, minimum: (n, m/32) u16, X: (T, m) f32,
    xt: (tiles, m/32, 8, 8) i32, sxt, et: (tiles, m/32, 8) f32, out: (T, n) f32"""
    quantize_i4(X, xq, xs, e)
    tile_i4(xq, xs, e, xt, sxt, et)
    n, half = q.shape
    T = out.shape[0]
    ng = scale.shape[1]
    for b in prange((n + ROWS - 1) // ROWS):
        acc = np.empty((TILE_ROWS, TILE), np.float32)
        for i in range(b * ROWS, min(n, b * ROWS + ROWS), TILE_ROWS):
            rows = min(TILE_ROWS, n - i)
            _prefetch_rows(q, (i + PREFETCH_ROWS) * half, TILE_ROWS * half)
            for k in range(xt.shape[0]):
                acc[:] = 0.0
                for g in range(0, ng, 4):
                    if rows == TILE_ROWS:
                        i4_tile(acc, q, i * half + 16 * g, xt, (k * ng + g) * 64, sxt, et, (k * ng + g) * 8,
                                scale, minimum, i * ng + g, ng, min(4, ng - g), TILE_ROWS)
                    else:
                        for r in range(rows):
                            i4_tile(acc[r:], q, (i + r) * half + 16 * g, xt, (k * ng + g) * 64, sxt, et,
                                    (k * ng + g) * 8, scale, minimum, (i + r) * ng + g, ng, min(4, ng - g), 1)
                _store_tile(acc, k, i, rows, out)


@njit(nogil=True, cache=True)
def _prefetch_rows(q, start, size):
    """Prefetch q's flat bytes [start, start + size) into L2, where they exist."""
    if start + size <= q.size:
        for off in range(start, start + size, 64):
            prefetch_l2(q, off)


@njit(nogil=True, cache=True)
def _store_tile(acc, k, i, rows, out):
    """out[8k + l, i + r] = acc[r, l] for the tile's tokens.   acc: (TILE_ROWS, 8) f32, out: (T, n) f32"""
    for r in range(rows):
        for l in range(min(TILE, out.shape[0] - TILE * k)):
            out[TILE * k + l, i + r] = acc[r, l]


# ------------------------------------------------------------ compilation

# numba's disk cache knows a kernel by its name and its own file's timestamp, not by the
# intrinsics (kernels/idot.py) it inlines: a digest of both files in the names keeps a
# kernel cached before idot.py changed from being loaded after.
_SOURCE_TAG = hashlib.sha1(b"".join(Path(m.__file__).read_bytes() for m in (idot, sys.modules[__name__]))).hexdigest()[:10]


def _specialize(f, path: str, parallel: bool):
    """f compiled for one CPU path: its globals see that path's intrinsics. Each variant gets
    a name of its own (path, variant, _SOURCE_TAG): numba's disk cache is keyed by name, not
    by globals."""
    glb = dict(f.__globals__)
    glb.update(idot.make_row_intrinsics(path))
    glb.update(idot.make_tile_intrinsics(path))
    name = f"{f.__name__}_{path}_{'parallel' if parallel else 'serial'}_{_SOURCE_TAG}"
    g = FunctionType(f.__code__, glb, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    g.__doc__ = f.__doc__
    if parallel:
        return njit(parallel=True, cache=True)(g)
    return njit(nogil=True, cache=True)(g)


class PathKernels:
    """The kernels of one CPU path, each compiled on first use (serial and parallel apart)."""

    _SOURCES = {"rows_i8": _rows_i8, "rows_i4": _rows_i4, "tiles_i8": _tiles_i8, "tiles_i4": _tiles_i4}

    def __init__(self, path: str):
        self.path = path
        self.vnni = path in ("avx512vnni", "avxvnni")
        # The generic path multiplies row by row for any T (no tiles).
        self.generic = path == "generic"
        self._compiled = {}
        self._lock = threading.Lock()

    def get(self, name: str, parallel: bool):
        key = (name, parallel)
        fn = self._compiled.get(key)
        if fn is None:
            with self._lock:
                fn = self._compiled.get(key)
                if fn is None:
                    fn = self._compiled[key] = _specialize(self._SOURCES[name], self.path, parallel)
        return fn


_paths = {}


def kernels(path=None) -> PathKernels:
    """The kernel set of `path` (default: isa.best_path())."""
    path = path or isa.best_path()
    ks = _paths.get(path)
    if ks is None:
        ks = _paths.setdefault(path, PathKernels(path))
    return ks


quantize_i8 = njit(nogil=True, cache=True)(_quantize_i8)


@njit(cache=True)
def matmul_int8_reference(q, scale, X, out):
    """What matmul_int8 computes on every path, written plainly (the specification the tests hold
    it to, bit for bit): X's rows rounded to int8 per group of 64 (quantize_i8), each group's
    dot product in integers, then the canonical float order of kernels/idot.py.
    q: (n, m) i8, scale: (n, m/64) u16 (fp16 bits), X: (T, m) f32, out: (T, n) f32"""
    T, m = X.shape
    n, ng = scale.shape
    xq = np.empty((T, m), np.int8)
    xs = np.empty((T, ng), np.float32)
    quantize_i8(X, xq, xs, np.empty((T, ng), np.int32))
    p = np.zeros(4, np.float32)
    for t in range(T):
        for i in range(n):
            acc = np.float32(0.0)
            for g0 in range(0, ng, 4):
                p[:] = 0.0
                for k in range(min(4, ng - g0)):
                    g = g0 + k
                    dot = 0
                    for j in range(64 * g, 64 * g + 64):
                        dot += np.int32(q[i, j]) * np.int32(xq[t, j])
                    p[k] = np.float32(dot) * (f16_to_f32(scale[i, g]) * xs[t, g])
                acc = acc + ((p[0] + p[2]) + (p[1] + p[3]))
            out[t, i] = acc
quantize_i4 = njit(nogil=True, cache=True)(_quantize_i4)
tile_i8 = njit(nogil=True, cache=True)(_tile_i8)
tile_i4 = njit(nogil=True, cache=True)(_tile_i4)
negated_sums_i8 = njit(parallel=True, cache=True)(_negated_sums_i8)


# ----------------------------------------------------------- work buffers

class Work(threading.local):
    """Per calling thread: the scratch arrays of a product, by (format, tokens, width). The last
    MAX_SHAPES are kept, so a step shaped like the last allocates nothing."""

    MAX_SHAPES = 64

    def __init__(self):
        self.shapes = {}

    def get(self, fmt: str, T: int, m: int) -> tuple:
        """int8: (xq, xs, xc, xt, sxt); int4: (xq, xs, e, xt, sxt, et) (xt... only when T > ROW_TOKENS)."""
        bufs = self.shapes.get((fmt, T, m))
        if bufs is None:
            if len(self.shapes) >= self.MAX_SHAPES:
                self.shapes.clear()
            group = I8_GROUP if fmt == "int8" else I4_GROUP
            ng, tiles = m // group, (T + TILE - 1) // TILE if T > ROW_TOKENS else 0
            words = 16 if fmt == "int8" else 8
            bufs = (np.empty((T, m), np.int8), np.empty((T, ng), np.float32),
                    np.empty((T, ng), np.int32 if fmt == "int8" else np.float32),
                    np.empty((tiles, ng, words, TILE), np.int32), np.empty((tiles, ng, TILE), np.float32))
            if fmt == "int4":
                bufs += (np.empty((tiles, ng, TILE), np.float32),)
            self.shapes[fmt, T, m] = bufs
        return bufs


_work = Work()


class _WeightSums:
    """-128 * the group sums of each int8 matrix the tiles have multiplied (the VNNI paths' term
    for their unsigned activations), computed on first use and kept while the matrix lives."""

    def __init__(self):
        self._sums = {}
        self._lock = threading.Lock()

    def of(self, q: np.ndarray) -> np.ndarray:
        key = id(q)
        hit = self._sums.get(key)
        if hit is not None and hit[0]() is q:
            return hit[1]
        nw = np.empty((q.shape[0], q.shape[1] // I8_GROUP), np.int32)
        negated_sums_i8(q, nw)
        with self._lock:
            self._sums[key] = (weakref.ref(q, lambda _, k=key: self._sums.pop(k, None)), nw)
        return nw


_weight_sums = _WeightSums()


# ------------------------------------------------------------------ products

def matmul_int8(q, scale, X, out, parallel: bool, path=None) -> None:
    """out = X @ W.T for an int8 matrix (rwkvcpu/formats.py Int8).

    Args:
        q: (n, m) int8 weights; scale: (n, m/64) uint16 (fp16 bits), C-contiguous.
        X: (T, m) float32, C-contiguous. out: (T, n) float32, C-contiguous, written.
        parallel: run on numba's threads (else on the calling thread, without the GIL).
        path: a kernels/isa.py path (default: the best this CPU has; tests pick others).
    """
    T, m = X.shape
    ks = kernels(path)
    xq, xs, xc, xt, sxt = _work.get("int8", T, m)
    if T <= ROW_TOKENS or ks.generic:
        ks.get("rows_i8", parallel)(q, scale, X, xq, xs, xc, out)
    else:
        nw = _weight_sums.of(q) if ks.vnni else xc
        ks.get("tiles_i8", parallel)(q, scale, nw, X, xq, xs, xc, ks.vnni, xt, sxt, out)


def matmul_int4(q, scale, minimum, X, out, parallel: bool, path=None) -> None:
    """out = X @ W.T for an int4 matrix (rwkvcpu/formats.py Int4).

    Args:
        q: (n, m/2) uint8 packed weights; scale, minimum: (n, m/32) uint16 (fp16 bits), C-contiguous.
        X: (T, m) float32, C-contiguous. out: (T, n) float32, C-contiguous, written.
        parallel, path: as matmul_int8.
    """
    T, m = X.shape
    ks = kernels(path)
    xq, xs, e, xt, sxt, et = _work.get("int4", T, m)
    if T <= ROW_TOKENS or ks.generic:
        ks.get("rows_i4", parallel)(q, scale, minimum, X, xq, xs, e, out)
    else:
        ks.get("tiles_i4", parallel)(q, scale, minimum, X, xq, xs, e, xt, sxt, et, out)
