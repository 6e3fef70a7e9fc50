"""Matrix products, one kernel per storage format: out[t] = W @ X[t] for a block of T tokens.

W is (n, m) = (out, in) in the layouts of rwkvcpu/formats.py, whose format
classes choose among these kernels; fp16 data (values, scales, mins) arrive as
uint16 bit patterns. Kernels write into `out` and the scratch arrays passed in;
none allocates.

One kernel serves every block size: a generated token is T = 1 (a
matrix-vector product), a prompt block or a batch of sequences T > 1. Each
(row, token) dot product is computed by the same machine code in the same
order whatever T is and whichever other tokens share the block, so a token's
output is the same to the bit alone or in any block. For fp32 and fp16
matrices of some size the engine uses BLAS for T > 1 instead
(rwkvcpu/matrix.py), which sums in another order.

Each kernel exists twice: `matmul_*` runs in parallel over blocks of output
rows (numba's static schedule: each thread streams one contiguous run of
rows), and `matmul_*_serial` is the same code on the calling thread, for
matrices so small that starting the thread team costs more than it saves.

The quantized kernels first quantize each row of X to int16 with one float scale per weight
group (`quantize_activations`), so each group's dot product is exact integer
arithmetic (pmaddwd / vpdpwssd) and only one int-to-float conversion and one
FMA per group remain. The int16 rounding moves each x[j] by at most
max|x over its group| / 65534: a relative error of ~1.5e-5, well below the
weights' own quantization error. `matmul_i8_reference` is the int8 product
written plainly, the specification the SIMD kernel is tested against.
"""

import numpy as np
from numba import njit, prange

from .compile import compile_kernel
from .f16 import f16_to_f32
from .simd import (dequantize_group, dot_group, dot_groups8, f32_bits, f32x8_absmax, f32x8_add,
                   f32x8_fma, f32x8_load, f32x8_max, f32x8_mul, f32x8_sum, f32x8_zero, prefetch)

# Exponent bits of a float32: all set for inf and NaN.
_EXPONENT = 0x7F800000
# How far ahead of the int4 kernel's reads to prefetch (prefetches never fault,
# so running past the end of the matrix is harmless).
_PREFETCH_BYTES = 4096


@njit(fastmath=True, cache=True)
def quantize_activations(x, paired, xq, xs):
    """Per group g of G = m / ngroups consecutive x: xs[g] = max|x_g| / 32767, xq = rint(x / xs[g]).
    x: (m,) f32, xq: (m,) i16, xs: (ngroups,) f32 (all C-contiguous; G % 8 == 0)

    Groups g < paired (an even count; G = 32) are stored in the int4 kernels' pair order
    (simd.INT4_PAIR_SLOT: weight j of group g goes to lane 16 k + 8 (g % 2) + i of
    its pair of groups), later ones in natural order.
    A group holding an inf or NaN gets xs[g] = NaN (and xq = 0), so the
    products that use it come out NaN, as the float product would.
    """
    ng = xs.shape[0]
    gs = x.shape[0] // ng
    # 2-D views: indices that are visibly non-negative let LLVM vectorise the loops.
    xg = x.reshape((ng, gs))
    qg = xq.reshape((ng, gs))
    for g in range(ng):
        vmax = f32x8_zero()
        for j in range(g * gs, g * gs + gs, 8):
            vmax = f32x8_absmax(vmax, f32x8_load(x, j))
        # inf or NaN: all exponent bits set. Tested on the bits, because
        # fastmath lets LLVM assume that no float is either.
        special = np.int32(0)
        for j in range(gs):
            special |= np.int32((f32_bits(xg[g, j]) & _EXPONENT) == _EXPONENT)
        amax = f32x8_max(vmax)
        inv = np.float32(1.0) / (amax / np.float32(32767.0)) if amax > 0 else np.float32(0.0)
        if special:
            xs[g] = np.float32(np.nan)
            inv = np.float32(0.0)
        else:
            xs[g] = amax / np.float32(32767.0)
        if g < paired:
            base = g // 2 * 64 + 8 * (g % 2)
            for j in range(32):
                v = np.int16(np.rint(xg[g, j] * inv)) if not special else np.int16(0)
                xq[base + (j % 2 * 2 + j // 16) * 16 + (j % 16) // 2] = v
        else:
            for j in range(gs):
                qg[g, j] = np.int16(np.rint(xg[g, j] * inv)) if not special else np.int16(0)


@njit(fastmath=True, cache=True)
def group_sums(x, xsum):
    """xsum[g] = sum of the G = m / ngroups consecutive x of group g (int4's min term).
    x: (m,) f32, xsum: (ngroups,) f32 (C-contiguous; G % 8 == 0)"""
    ng = xsum.shape[0]
    gs = x.shape[0] // ng
    for g in range(ng):
        vsum = f32x8_zero()
        for j in range(g * gs, g * gs + gs, 8):
            vsum = f32x8_add(vsum, f32x8_load(x, j))
        xsum[g] = f32x8_sum(vsum)


# Output rows per unit of parallel work. A block's rows are taken token by token:
# for T tokens each row is read from memory once and from the caches T times,
# and one token's activations stay in L1 across the block.
ROWS = 16


def _matmul_f32(w, X, out):
    """out[t, i] = sum_j w[i, j] X[t, j]
    w: (n, m) f32, X: (T, m) f32, out: (T, n) f32"""
    n, m = w.shape
    T = X.shape[0]
    for b in prange((n + ROWS - 1) // ROWS):
        for t in range(T):
            for i in range(b * ROWS, min(n, b * ROWS + ROWS)):
                acc = np.float32(0.0)
                for j in range(m):
                    acc += w[i, j] * X[t, j]
                out[t, i] = acc


def _matmul_f16(w, X, out):
    """out[t, i] = sum_j f32(w[i, j]) X[t, j]
    w: (n, m) u16 (fp16 bits), X: (T, m) f32, out: (T, n) f32"""
    n, m = w.shape
    T = X.shape[0]
    for b in prange((n + ROWS - 1) // ROWS):
        for t in range(T):
            for i in range(b * ROWS, min(n, b * ROWS + ROWS)):
                acc = np.float32(0.0)
                for j in range(m):
                    acc += f16_to_f32(w[i, j]) * X[t, j]
                out[t, i] = acc


def _matmul_i8(q, scale, X, xq, xs, out):
    """out[t, i] = sum_g scale[i, g] xs[t, g] sum_{j in g} q[i, j] xq[t, j]   (groups of 64)
    q: (n, m) i8, scale: (n, m/64) u16 (fp16 bits), X: (T, m) f32, out: (T, n) f32;
    scratch: xq: (T, m) i16, xs: (T, m/64) f32 (X's rows quantized, see quantize_activations).

    The groups' terms are summed in 8 lanes (group g in lane g % 8, the tail groups
    spread by dot_group), then across the lanes: matmul_i8_reference in another order."""
    T = X.shape[0]
    for t in range(T):
        quantize_activations(X[t], 0, xq[t], xs[t])
    n, m = q.shape
    ng = scale.shape[1]
    full = ng // 8 * 8
    for b in prange((n + ROWS - 1) // ROWS):
        for t in range(T):
            for i in range(b * ROWS, min(n, b * ROWS + ROWS)):
                acc = f32x8_zero()
                for g in range(0, full, 8):
                    c = f32x8_mul(f32x8_load(scale, i * ng + g), f32x8_load(xs, t * ng + g))
                    acc = dot_groups8(acc, q, i * m + 64 * g, xq, t * m + 64 * g, c)
                for g in range(full, ng):
                    acc = dot_group(acc, q, i * m + 64 * g, xq, t * m + 64 * g,
                                    f16_to_f32(scale[i, g]) * xs[t, g])
                out[t, i] = f32x8_sum(acc)


def _matmul_i4(q, scale, minimum, X, xq, xs, xsum, out):
    """out[t, i] = sum_g scale[i, g] xs[t, g] sum_{j in g} q[i, j] xq[t, j] + min[i, g] xsum[t, g]
    (groups of 32)
    q: (n, m/2) u8 (byte b of a group: weight b in the low nibble, b + 16 in the high),
    scale, minimum: (n, m/32) u16 (fp16 bits), X: (T, m) f32, out: (T, n) f32;
    scratch: xq: (T, m) i16, xs, xsum: (T, m/32) f32 (see quantize_activations; the groups of
    complete blocks of 8 take xq in pair order, the rest in natural order)."""
    n, half = q.shape
    m = 2 * half
    ng = scale.shape[1]
    full = ng // 8 * 8
    T = X.shape[0]
    for t in range(T):
        quantize_activations(X[t], full, xq[t], xs[t])
        group_sums(X[t], xsum[t])
    for b in prange((n + ROWS - 1) // ROWS):
        for t in range(T):
            for i in range(b * ROWS, min(n, b * ROWS + ROWS)):
                acc = f32x8_zero()
                for g in range(0, full, 8):
                    base = i * half + 16 * g
                    # The int4 loop computes so much per byte that the hardware prefetcher
                    # falls behind; fetching 4 KB ahead gains ~25% out of cache (measured).
                    prefetch(q, base + _PREFETCH_BYTES)
                    prefetch(q, base + _PREFETCH_BYTES + 64)
                    c = f32x8_mul(f32x8_load(scale, i * ng + g), f32x8_load(xs, t * ng + g))
                    acc = f32x8_fma(acc, f32x8_load(minimum, i * ng + g), f32x8_load(xsum, t * ng + g))
                    acc = dot_groups8(acc, q, base, xq, t * m + 32 * g, c)
                tail = np.float32(0.0)
                for g in range(full, ng):
                    acc = dot_group(acc, q, i * half + 16 * g, xq, t * m + 32 * g,
                                    f16_to_f32(scale[i, g]) * xs[t, g])
                    tail += f16_to_f32(minimum[i, g]) * xsum[t, g]
                out[t, i] = f32x8_sum(acc) + tail


@njit(cache=True)
def matmul_i8_reference(q, scale, X, xq, xs, out):
    """What matmul_i8 computes, written plainly (the specification its tests compare against):
    X's rows rounded to int16 per group of 64 (quantize_activations), then
    out[t, i] = sum_g scale[i, g] xs[t, g] sum_{j in g} q[i, j] xq[t, j], each group's dot
    product in integers, the sum over groups in float64.
    q: (n, m) i8, scale: (n, m/64) u16 (fp16 bits), X: (T, m) f32, out: (T, n) f32;
    scratch: xq: (T, m) i16, xs: (T, m/64) f32"""
    n, m = q.shape
    for t in range(X.shape[0]):
        quantize_activations(X[t], 0, xq[t], xs[t])
        for i in range(n):
            acc = 0.0
            for g in range(m // 64):
                dot = 0
                for j in range(64 * g, 64 * g + 64):
                    dot += np.int64(q[i, j]) * np.int64(xq[t, j])
                acc += np.float64(f16_to_f32(scale[i, g])) * np.float64(xs[t, g]) * dot
            out[t, i] = acc


matmul_f32 = compile_kernel(_matmul_f32, parallel=True)
matmul_f16 = compile_kernel(_matmul_f16, parallel=True)
matmul_i8 = compile_kernel(_matmul_i8, parallel=True)
matmul_i4 = compile_kernel(_matmul_i4, parallel=True)
matmul_f32_serial = compile_kernel(_matmul_f32, parallel=False)
matmul_f16_serial = compile_kernel(_matmul_f16, parallel=False)
matmul_i8_serial = compile_kernel(_matmul_i8, parallel=False)
matmul_i4_serial = compile_kernel(_matmul_i4, parallel=False)


def _dequantize_rows_f16(w, r0, out):
    """out[k, :] = W[r0 + k, :].   w: (n, m) u16 (fp16 bits), out: (rows, m) f32"""
    rows, m = out.shape
    for k in prange(rows):
        for j in range(m):
            out[k, j] = f16_to_f32(w[r0 + k, j])


def _dequantize_rows_i8(q, scale, r0, out):
    """out[k, j] = q[r0 + k, j] * scale[r0 + k, j // 64].   q: (n, m) i8, scale: (n, m/64) u16, out: (rows, m) f32"""
    rows, m = out.shape
    ng = scale.shape[1]
    for k in prange(rows):
        i = r0 + k
        for g in range(ng):
            dequantize_group(q, i * m + 64 * g, f16_to_f32(scale[i, g]), np.float32(0.0), out, k * m + 64 * g)


def _dequantize_rows_i4(q, scale, minimum, r0, out):
    """out[k, 32 g + b] = (low nibble of q[r0 + k, 16 g + b]) * scale + min, out[k, 32 g + 16 + b] from the high nibble.
    q: (n, m/2) u8, scale, minimum: (n, m/32) u16, out: (rows, m) f32"""
    rows, m = out.shape
    half = q.shape[1]
    ng = scale.shape[1]
    for k in prange(rows):
        i = r0 + k
        for g in range(ng):
            dequantize_group(q, i * half + 16 * g, f16_to_f32(scale[i, g]), f16_to_f32(minimum[i, g]),
                             out, k * m + 32 * g)


# Parallel over rows, for the engine's own calls; serial and GIL-free, for the
# GEMM workers of matrix.matmul (each dequantizes its own tiles).
dequantize_rows_f16 = compile_kernel(_dequantize_rows_f16, parallel=True)
dequantize_rows_i8 = compile_kernel(_dequantize_rows_i8, parallel=True)
dequantize_rows_i4 = compile_kernel(_dequantize_rows_i4, parallel=True)
dequantize_rows_f16_serial = compile_kernel(_dequantize_rows_f16, parallel=False)
dequantize_rows_i8_serial = compile_kernel(_dequantize_rows_i8, parallel=False)
dequantize_rows_i4_serial = compile_kernel(_dequantize_rows_i4, parallel=False)
