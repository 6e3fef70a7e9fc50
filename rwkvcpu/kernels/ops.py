"""Elementwise kernels: token shift, mixing, activations, residual updates.

Every kernel works on a block of T rows (T = 1 on the one-token path), writes
into arrays passed in and never allocates. They are serial: for vectors of a
few thousand floats a parallel launch costs more than the work.
"""

import numpy as np
from numba import njit

# fastmath without "nnan"/"ninf": v4's state holds a huge negative running
# exponent and the max-trick relies on exp() of it being exactly 0, so the
# compiler must not assume values are finite.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(fastmath=FASTMATH, cache=True)
def token_shift(x, prev, dx):
    """dx[t] = x[t-1] - x[t], where x[-1] is `prev`; then prev <- x[T-1].

    x: (T, D) f32, prev: (D,) f32 (updated in place), dx: (T, D) f32
    """
    T, D = x.shape
    for j in range(D):
        dx[0, j] = prev[j] - x[0, j]
    for t in range(1, T):
        for j in range(D):
            dx[t, j] = x[t - 1, j] - x[t, j]
    for j in range(D):
        prev[j] = x[T - 1, j]


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
