"""Elementwise kernels: token shift, mixing, activations, residual updates.

Every kernel works on a block of T rows (T = 1 when one sequence decodes; a
prompt chunk, or the tokens of several sequences, otherwise), writes into
arrays passed in and never allocates. Only token_shift sees where one
sequence ends and the next begins. They are serial: for vectors of a
few thousand floats a parallel launch costs more than the work.
"""

import numpy as np
from numba import njit

# fastmath without "nnan"/"ninf": v4's state holds a huge negative running
# exponent and the max-trick relies on exp() of it being exactly 0, so the
# compiler must not assume values are finite.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(fastmath=FASTMATH, cache=True)
def token_shift(x, states, segs, off, dx):
    """dx[t] = x[t-1] - x[t] within each sequence of the block; a sequence's first row takes
    x[t-1] from its state (D floats at `off` of its row), which then keeps its last row.

    x: (T, D) f32, states: (C, F) f32 (updated), segs: (B, 3) i64 (state row, first row,
    end row of each sequence; see kernels/wkv.py), off: int, dx: (T, D) f32
    """
    D = x.shape[1]
    for b in range(segs.shape[0]):
        prev = states[segs[b, 0], off:off + D]
        t0, t1 = segs[b, 1], segs[b, 2]
        for j in range(D):
            dx[t0, j] = prev[j] - x[t0, j]
        for t in range(t0 + 1, t1):
            for j in range(D):
                dx[t, j] = x[t - 1, j] - x[t, j]
        for j in range(D):
            prev[j] = x[t1 - 1, j]


@njit(fastmath=FASTMATH, cache=True)
def shift_mix(x, states, segs, off, maa, out):
    """out[m, t] = x[t] + (x[t-1] - x[t]) * maa[m]: token_shift and mix in one pass, for the
    generations whose mixes need nothing else of the shift. Within each sequence of the block; a
    sequence's first row takes x[t-1] from its state (D floats at `off` of its row), which then
    keeps its last row.

    x: (T, D) f32, states: (C, F) f32 (updated), segs: (B, 3) i64 (see token_shift), off: int,
    maa: (>= M, D) f32, out: (M, T, D) f32
    """
    M = out.shape[0]
    D = x.shape[1]
    for b in range(segs.shape[0]):
        prev = states[segs[b, 0], off:off + D]
        t0, t1 = segs[b, 1], segs[b, 2]
        for m in range(M):
            for j in range(D):
                out[m, t0, j] = x[t0, j] + (prev[j] - x[t0, j]) * maa[m, j]
            for t in range(t0 + 1, t1):
                for j in range(D):
                    out[m, t, j] = x[t, j] + (x[t - 1, j] - x[t, j]) * maa[m, j]
        for j in range(D):
            prev[j] = x[t1 - 1, j]


@njit(fastmath=FASTMATH, cache=True)
def mix(x, dx, maa, out):
    """out[m, t] = x[t] + dx[t] * maa[m]   (token-shift interpolation, one per coefficient row).

    x, dx: (T, D) f32, maa: (M, D) f32, out: (M, T, D) f32
    """
    M, T, D = out.shape
    for m in range(M):
        for t in range(T):
            for j in range(D):
                out[m, t, j] = x[t, j] + dx[t, j] * maa[m, j]


@njit(fastmath=FASTMATH, cache=True)
def mix_dynamic(x, dx, maa, delta, out):
    """out[m, t] = x[t] + dx[t] * (maa[m] + delta[m, t])   (v6 data-dependent mixing).

    x, dx: (T, D) f32, maa: (M, D) f32, delta: (M, T, D) f32, out: (M, T, D) f32
    """
    M, T, D = out.shape
    for m in range(M):
        for t in range(T):
            for j in range(D):
                out[m, t, j] = x[t, j] + dx[t, j] * (maa[m, j] + delta[m, t, j])


@njit(fastmath=FASTMATH, cache=True)
def sigmoid_(x):
    """x <- 1 / (1 + exp(-x)).   x: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            x[t, j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-x[t, j]))


@njit(fastmath=FASTMATH, cache=True)
def sigmoid_bias_(x, bias):
    """x <- sigmoid(x + bias).   x: (T, N) f32, bias: (N,) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            x[t, j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-(x[t, j] + bias[j])))


@njit(fastmath=FASTMATH, cache=True)
def silu_(x):
    """x <- x * sigmoid(x).   x: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            v = x[t, j]
            x[t, j] = v / (np.float32(1.0) + np.exp(-v))


@njit(fastmath=FASTMATH, cache=True)
def tanh_(x):
    """x <- tanh(x).   x: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            x[t, j] = np.tanh(x[t, j])


@njit(fastmath=FASTMATH, cache=True)
def relu_square_(x):
    """x <- max(x, 0)^2.   x: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            v = max(x[t, j], np.float32(0.0))
            x[t, j] = v * v


@njit(fastmath=FASTMATH, cache=True)
def mul_(x, y):
    """x <- x * y.   x, y: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            x[t, j] *= y[t, j]


@njit(fastmath=FASTMATH, cache=True)
def add_(x, y):
    """x <- x + y   (the residual connection).   x, y: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            x[t, j] += y[t, j]


@njit(fastmath=FASTMATH, cache=True)
def add_product_(x, y, g):
    """x <- x + y * g   (a gated residual).   x, y, g: (T, N) f32"""
    T, N = x.shape
    for t in range(T):
        for j in range(N):
            x[t, j] += y[t, j] * g[t, j]
