"""fp32 and fp16 matrix products, and dequantizing rows of any format: out[t] = W @ X[t].

W is (n, m) = (out, in) in the layouts of rwkvcpu/formats.py, whose format
classes choose among these kernels; fp16 data (values, scales, mins) arrive as
uint16 bit patterns. Kernels write into `out` and never allocate. (int8 and
int4 products are in kernels/qmatmul.py.)

One kernel serves every block size: a generated token is T = 1 (a
matrix-vector product), a prompt block or a batch of sequences T > 1. Each
(row, token) dot product is computed by the same machine code in the same
order whatever T is and whichever other tokens share the block, so a token's
output is the same to the bit alone or in any block. For matrices of some
size the engine uses BLAS for T > 1 instead (rwkvcpu/matrix.py), which sums in
another order.

Each kernel exists twice: `matmul_*` runs in parallel over blocks of output
rows (numba's static schedule: each thread streams one contiguous run of
rows), and `matmul_*_serial` is the same code on the calling thread, for
matrices so small that starting the thread team costs more than it saves.
"""

import numpy as np
from numba import prange

from .compile import compile_kernel
from .f16 import f16_to_f32
from .simd import dequantize_group

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


matmul_f32 = compile_kernel(_matmul_f32, parallel=True)
matmul_f16 = compile_kernel(_matmul_f16, parallel=True)
matmul_f32_serial = compile_kernel(_matmul_f32, parallel=False)
matmul_f16_serial = compile_kernel(_matmul_f16, parallel=False)


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
