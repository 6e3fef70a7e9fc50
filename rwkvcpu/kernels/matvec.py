"""Matrix-vector kernels, one per storage format: out = W @ x.

W is (out, in) in the layouts of quant/formats.py; fp16 data (values, scales,
mins) arrive as uint16 bit patterns. Each kernel is parallel over output rows
and writes into `out`; none allocates.
"""

import numpy as np
from numba import njit, prange

from .f16 import f16_to_f32


@njit(parallel=True, fastmath=True, cache=True)
def matvec_f32(w, x, out):
    """out[i] = sum_j w[i, j] x[j].   w: (n, m) f32, x: (m,) f32, out: (n,) f32"""
    n, m = w.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(m):
            acc += w[i, j] * x[j]
        out[i] = acc


@njit(parallel=True, fastmath=True, cache=True)
def matvec_f16(w, x, out):
    """w: (n, m) u16 (fp16 bits), x: (m,) f32, out: (n,) f32"""
    n, m = w.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(m):
            acc += f16_to_f32(w[i, j]) * x[j]
        out[i] = acc


@njit(parallel=True, fastmath=True, cache=True)
def matvec_i8(q, scale, x, out):
    """out[i] = sum_g scale[i, g] * sum_{j in g} q[i, j] x[j].
    q: (n, m) i8, scale: (n, m/G) u16 (fp16 bits), x: (m,) f32, out: (n,) f32"""
    n, m = q.shape
    ngroups = scale.shape[1]
    gs = m // ngroups
    for i in prange(n):
        acc = np.float32(0.0)
        for g in range(ngroups):
            part = np.float32(0.0)
            base = g * gs
            for j in range(gs):
                part += np.float32(q[i, base + j]) * x[base + j]
            acc += part * f16_to_f32(scale[i, g])
        out[i] = acc


@njit(fastmath=True, cache=True)
def group_sums(x, gs, sums):
    """sums[g] = sum of x over group g.   x: (m,) f32, sums: (m/gs,) f32"""
    for g in range(sums.shape[0]):
        s = np.float32(0.0)
        for j in range(gs):
            s += x[g * gs + j]
        sums[g] = s


@njit(parallel=True, fastmath=True, cache=True)
def matvec_i4(q, scale, minimum, x, xsums, out):
    """out[i] = sum_g scale[i,g] * sum_{j in g} q[i,j] x[j] + min[i,g] * xsums[g].
    q: (n, m/2) u8 (two 4-bit weights per byte, low nibble = weight b, high = b+16 of its group of 32),
    scale, minimum: (n, m/32) u16 (fp16 bits), x: (m,) f32, xsums: (m/32,) f32, out: (n,) f32"""
    n = q.shape[0]
    ngroups = scale.shape[1]
    half = q.shape[1] // ngroups
    gs = 2 * half
    for i in prange(n):
        acc = np.float32(0.0)
        for g in range(ngroups):
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            qb = g * half
            xb = g * gs
            for b in range(half):
                byte = q[i, qb + b]
                lo += np.float32(byte & 15) * x[xb + b]
                hi += np.float32(byte >> 4) * x[xb + half + b]
            acc += (lo + hi) * f16_to_f32(scale[i, g]) + f16_to_f32(minimum[i, g]) * xsums[g]
        out[i] = acc


@njit(parallel=True, fastmath=True, cache=True)
def dequantize_rows_f16(w, r0, out):
    """out[k, :] = W[r0 + k, :].   w: (n, m) u16, out: (rows, m) f32"""
    rows, m = out.shape
    for k in prange(rows):
        for j in range(m):
            out[k, j] = f16_to_f32(w[r0 + k, j])


@njit(parallel=True, fastmath=True, cache=True)
def dequantize_rows_i8(q, scale, r0, out):
    """q: (n, m) i8, scale: (n, m/G) u16, out: (rows, m) f32"""
    rows, m = out.shape
    gs = m // scale.shape[1]
    for k in prange(rows):
        for j in range(m):
            out[k, j] = np.float32(q[r0 + k, j]) * f16_to_f32(scale[r0 + k, j // gs])


@njit(parallel=True, fastmath=True, cache=True)
def dequantize_rows_i4(q, scale, minimum, r0, out):
    """q: (n, m/2) u8, scale, minimum: (n, m/32) u16, out: (rows, m) f32"""
    rows, m = out.shape
    ngroups = scale.shape[1]
    half = q.shape[1] // ngroups
    for k in prange(rows):
        i = r0 + k
        for g in range(ngroups):
            s = f16_to_f32(scale[i, g])
            mn = f16_to_f32(minimum[i, g])
            for b in range(half):
                byte = q[i, g * half + b]
                out[k, g * 2 * half + b] = np.float32(byte & 15) * s + mn
                out[k, g * 2 * half + half + b] = np.float32(byte >> 4) * s + mn
