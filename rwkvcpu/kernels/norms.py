"""Layer norm and per-head group norm, row by row.

Both work on a block of T rows at once (T = 1 on the one-token path) and
write into `out`, which may be the input itself. Sums are taken in float64:
the rows are short (D), so it costs nothing and keeps the result within
rounding of the reference's fp32 layer norm.
"""

import numpy as np
from numba import njit

from .ops import FASTMATH


@njit(fastmath=FASTMATH, cache=True)
def layer_norm(x, weight, bias, eps, out):
    """out[t] = (x[t] - mean(x[t])) / sqrt(var(x[t]) + eps) * weight + bias.

    x: (T, D) f32, weight, bias: (D,) f32, eps: float, out: (T, D) f32 (may be x)
    """
    T, D = x.shape
    for t in range(T):
        s = 0.0
        for j in range(D):
            s += x[t, j]
        mean = s / D
        s2 = 0.0
        for j in range(D):
            d = x[t, j] - mean
            s2 += d * d
        inv = 1.0 / np.sqrt(s2 / D + eps)
        for j in range(D):
            out[t, j] = np.float32((x[t, j] - mean) * inv) * weight[j] + bias[j]


@njit(fastmath=FASTMATH, cache=True)
def head_norm(x, t, b, S, weight, bias, eps, out):
    """Layer norm of the S channels x[t, b:b+S] (one head), then a per-channel affine, into out[t, b:b+S].

    x, out: (T, D) f32 (out may be x), weight, bias: (D,) f32, eps: float
    """
    s = 0.0
    for j in range(S):
        s += x[t, b + j]
    mean = s / S
    s2 = 0.0
    for j in range(S):
        d = x[t, b + j] - mean
        s2 += d * d
    inv = 1.0 / np.sqrt(s2 / S + eps)
    for j in range(S):
        out[t, b + j] = np.float32((x[t, b + j] - mean) * inv) * weight[b + j] + bias[b + j]


@njit(fastmath=FASTMATH, cache=True)
def group_norm(x, n_head, weight, bias, eps, out):
    """Layer norm of each head's S = D / n_head channels, then a per-channel affine.

    out[t, h*S + j] = (x[t, h*S + j] - mean_h) / sqrt(var_h + eps) * weight[h*S + j] + bias[h*S + j]

    x: (T, D) f32, n_head: int, weight, bias: (D,) f32, eps: float, out: (T, D) f32 (may be x)
    """
    T, D = x.shape
    S = D // n_head
    for t in range(T):
        for h in range(n_head):
            head_norm(x, t, h * S, S, weight, bias, eps, out)
