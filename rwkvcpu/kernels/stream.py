"""A streaming read: the memory-bandwidth yardstick the benchmarks divide by."""

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def read_rows(a, out):
    """out[i] = sum_j a[i, j]: every byte of `a` read once.   a: (n, m) f32, out: (n,) f32"""
    n, m = a.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(m):
            acc += a[i, j]
        out[i] = acc
