"""The time-mix recurrences ("WKV") of each generation, and the per-token
inputs only they need (decays, normalised keys, v7's value residual).

A block of T tokens may hold several sequences (a batch): `segs` says which
rows are whose, and where each one's state lives.

    segs: (B, 3) i64     sequence b's tokens are rows segs[b, 1] .. segs[b, 2] - 1 of the
                         block, in order; its state is row segs[b, 0] of `states`
    states: (C, F) f32   one flat state per row (a StatePool's array, or one State's as (1, F))
    off: int             where this layer's section starts within a state row (rwkvcpu.state)

Each recurrence runs a sequence's tokens serially through its own state,
which it updates in place (no copy in or out), and writes one output row per
token; sequences (and v5-v7's heads) are independent. The matrix products
around them are done beforehand for all T tokens at once.

State layouts (see rwkvcpu/state.py): v4 keeps three per-channel vectors
(aa, bb, pp); v5/v6 keep s[head, key, value]; v7 keeps s[head, value, key].
"""

import numba
import numpy as np
from numba import njit, prange

from .compile import compile_kernel
from .norms import head_norm
from .ops import FASTMATH


@njit(fastmath=FASTMATH, cache=True)
def wkv4(k, v, log_decay, bonus, states, segs, aa_off, bb_off, pp_off, out):
    """RWKV-4 recurrence, with the max-trick that keeps exp() from overflowing.

    The state is a numerator aa, a denominator bb, and a running exponent pp
    such that the true sums are aa * exp(pp) and bb * exp(pp). Per channel c:

        q = max(pp, u + k);   out = (e^(pp-q) aa + e^(u+k-q) v) / (e^(pp-q) bb + e^(u+k-q))
        q = max(pp + w, k);   aa = e^(pp+w-q) aa + e^(k-q) v;  bb = e^(pp+w-q) bb + e^(k-q);  pp = q

    with w = log_decay (= -exp(time_decay)) and u = bonus (time_first).

    k, v: (T, D) f32, log_decay, bonus: (D,) f32, states: (C, F) f32 (aa, bb, pp: (D,) at
    aa_off, bb_off, pp_off of each sequence's row, updated), segs: (B, 3) i64, out: (T, D) f32
    """
    D = k.shape[1]
    for b in range(segs.shape[0]):
        row, t0, t1 = segs[b, 0], segs[b, 1], segs[b, 2]
        aa = states[row, aa_off:aa_off + D]
        bb = states[row, bb_off:bb_off + D]
        pp = states[row, pp_off:pp_off + D]
        for c in range(D):
            a = aa[c]
            bv = bb[c]
            p = pp[c]
            w = log_decay[c]
            u = bonus[c]
            for t in range(t0, t1):
                kt = k[t, c]
                vt = v[t, c]
                ww = u + kt
                q = max(p, ww)
                e1 = np.exp(p - q)
                e2 = np.exp(ww - q)
                out[t, c] = (e1 * a + e2 * vt) / (e1 * bv + e2)
                ww = p + w
                q = max(ww, kt)
                e1 = np.exp(ww - q)
                e2 = np.exp(kt - q)
                a = e1 * a + e2 * vt
                bv = e1 * bv + e2
                p = q
            aa[c] = a
            bb[c] = bv
            pp[c] = p


@njit(fastmath=FASTMATH, cache=True)
def wkv5_head(h, t0, t1, r, k, v, decay, bonus, s, out):
    """RWKV-5/6 recurrence of head h over tokens t0 .. t1 - 1 (i: key channel, j: value channel):

        out[t, j] = sum_i r[t, i] * (bonus[i] * k[t, i] * v[t, j] + s[i, j])
        s[i, j]   = decay[t, i] * s[i, j] + k[t, i] * v[t, j]

    v5 has one decay row for every token (decay: (1, D)); v6's is data-dependent (decay: (T, D)).

    h, t0, t1: int, r, k, v: (T, D) f32, decay: (T, D) or (1, D) f32, bonus: (D,) f32,
    s: (H, S, S) f32 [head, key, value] (head h updated), out: (T, D) f32 (head h's columns written)
    """
    S = s.shape[1]
    per_token = decay.shape[0] > 1
    base = h * S
    u = bonus[base:base + S]
    for t in range(t0, t1):
        # 1-D views of this head's rows: LLVM vectorises the j loops over them.
        w = decay[t if per_token else 0, base:base + S]
        rt = r[t, base:base + S]
        kt = k[t, base:base + S]
        vt = v[t, base:base + S]
        y = out[t, base:base + S]
        y[:] = 0.0
        for i in range(S):
            row = s[h, i]
            ri = rt[i]
            ki = kt[i]
            wi = w[i]
            rku = ri * ki * u[i]
            for j in range(S):
                sij = row[j]
                y[j] += ri * sij + rku * vt[j]
                row[j] = sij * wi + ki * vt[j]


@njit(fastmath=FASTMATH, cache=True)
def wkv7_head(h, t0, t1, r, w, k, v, kk, kka, s, out):
    """RWKV-7 recurrence (the generalised delta rule) of head h over tokens t0 .. t1 - 1
    (i: value channel, j: key channel):

        s[i, j] = s[i, j] * w[t, j] - (sum_l s[i, l] kk[t, l]) * kka[t, j] + v[t, i] * k[t, j]
        out[t, i] = sum_j s[i, j] * r[t, j]

    with kk the L2-normalised key and kka = kk * a (the in-context learning rate).

    h, t0, t1: int, r, w, k, v, kk, kka: (T, D) f32, s: (H, S, S) f32 [head, value, key]
    (head h updated), out: (T, D) f32 (head h's columns written)
    """
    S = s.shape[1]
    base = h * S
    for t in range(t0, t1):
        # 1-D views of this head's rows: LLVM vectorises the j loops over them.
        rt = r[t, base:base + S]
        wt = w[t, base:base + S]
        kt = k[t, base:base + S]
        kkt = kk[t, base:base + S]
        kat = kka[t, base:base + S]
        for i in range(S):
            row = s[h, i]
            sa = np.float32(0.0)
            for j in range(S):
                sa += row[j] * kkt[j]
            vi = v[t, base + i]
            acc = np.float32(0.0)
            for j in range(S):
                x = row[j] * wt[j] - sa * kat[j] + vi * kt[j]
                row[j] = x
                acc += x * rt[j]
            out[t, base + i] = acc


def _wkv5(r, k, v, decay, bonus, states, segs, off, n_head, out):
    """wkv5_head for every (sequence, head) pair (in parallel in the parallel variant).
    states: (C, F) f32, each sequence's (H, S, S) matrices at `off` of its row; segs: (B, 3) i64"""
    S = r.shape[1] // n_head
    for p in prange(segs.shape[0] * n_head):
        b, h = p // n_head, p % n_head
        s = states[segs[b, 0], off:off + n_head * S * S].reshape((n_head, S, S))
        wkv5_head(h, segs[b, 1], segs[b, 2], r, k, v, decay, bonus, s, out)


def _wkv7(r, w, k, v, kk, kka, states, segs, off, n_head, out):
    """wkv7_head for every (sequence, head) pair (in parallel in the parallel variant).
    states: (C, F) f32, each sequence's (H, S, S) matrices at `off` of its row; segs: (B, 3) i64"""
    S = r.shape[1] // n_head
    for p in prange(segs.shape[0] * n_head):
        b, h = p // n_head, p % n_head
        s = states[segs[b, 0], off:off + n_head * S * S].reshape((n_head, S, S))
        wkv7_head(h, segs[b, 1], segs[b, 2], r, w, k, v, kk, kka, s, out)


# Each recurrence runs its (sequence, head) pairs in parallel, or serially for
# calls too small to be worth waking the thread team (one token of a small
# model); compile_kernel gives the two variants names of their own, so numba's
# on-disk cache keeps them apart. Both compute every head the same way: the
# same bits.
wkv5_parallel = compile_kernel(_wkv5, parallel=True, fastmath=FASTMATH)
wkv5_serial = compile_kernel(_wkv5, parallel=False, fastmath=FASTMATH)
wkv7_parallel = compile_kernel(_wkv7, parallel=True, fastmath=FASTMATH)
wkv7_serial = compile_kernel(_wkv7, parallel=False, fastmath=FASTMATH)


# Multiply-adds (T * H * S * S) below which a recurrence runs on the calling thread.
PARALLEL_MIN_WORK = 1 << 18


def _serial(r, n_head) -> bool:
    """Run on the calling thread: too little work to wake the thread team, or no team (one thread)."""
    return r.shape[0] * r.shape[1] * (r.shape[1] // n_head) < PARALLEL_MIN_WORK or numba.get_num_threads() == 1


def wkv5(r, k, v, decay, bonus, states, segs, off, n_head, out):
    """RWKV-5/6 recurrence of every sequence and head (see wkv5_head), serial or parallel by the amount of work."""
    small = _serial(r, n_head)
    (wkv5_serial if small else wkv5_parallel)(r, k, v, decay, bonus, states, segs, off, n_head, out)


def wkv7(r, w, k, v, kk, kka, states, segs, off, n_head, out):
    """RWKV-7 recurrence of every sequence and head (see wkv7_head), serial or parallel by the amount of work."""
    small = _serial(r, n_head)
    (wkv7_serial if small else wkv7_parallel)(r, w, k, v, kk, kka, states, segs, off, n_head, out)


@njit(fastmath=FASTMATH, cache=True)
def decay_v6_(w, w0):
    """w <- exp(-exp(w0 + w))   (v6's data-dependent decay from its low-rank term w).

    w: (T, D) f32, w0: (D,) f32
    """
    T, D = w.shape
    for t in range(T):
        for j in range(D):
            w[t, j] = np.exp(-np.exp(w0[j] + w[t, j]))


# exp(-0.5) as the reference writes it; the decay lies in (exp(-exp(-0.5)), 1).
_V7_DECAY_SCALE = np.float32(0.606531)


@njit(fastmath=FASTMATH, cache=True)
def prepare_v7(w, w0, a, a0, v, v_first, z, v0, first, k, k_k, k_a, n_head, kk, kka):
    """v7's inputs of the recurrence from its products, in one pass over the block:

        w <- exp(-0.606531 sigmoid(w0 + w))                 decay
        a <- sigmoid(a0 + a)                                 in-context learning rate
        layer 0 (first): v_first <- v;  later: v <- v + (v_first - v) sigmoid(v0 + z)   value residual
        kk = normalize(k * k_k) per head (L2, floor 1e-12), kka = kk * a;  k <- k (1 + (a - 1) k_a)

    w, a, v, k: (T, D) f32 (updated), w0, a0, v0, k_k, k_a: (D,) f32, v_first, z: (T, D) f32,
    first: bool, n_head: int, kk, kka: (T, D) f32 (outputs). In layer 0, z and v0 are not read:
    pass any arrays of their types (one compiled variant serves every layer).
    """
    T, D = k.shape
    S = D // n_head
    for t in range(T):
        for j in range(D):
            sig = np.float32(1.0) / (np.float32(1.0) + np.exp(-(w0[j] + w[t, j])))
            w[t, j] = np.exp(-_V7_DECAY_SCALE * sig)
            a[t, j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-(a[t, j] + a0[j])))
        if first:
            for j in range(D):
                v_first[t, j] = v[t, j]
        else:
            for j in range(D):
                g = np.float32(1.0) / (np.float32(1.0) + np.exp(-(v0[j] + z[t, j])))
                v[t, j] += (v_first[t, j] - v[t, j]) * g
        for h in range(n_head):
            b = h * S
            ss = np.float32(0.0)
            for j in range(S):
                x = k[t, b + j] * k_k[b + j]
                kk[t, b + j] = x
                ss += x * x
            inv = np.float32(1.0) / max(np.sqrt(ss), np.float32(1e-12))
            for j in range(S):
                x = kk[t, b + j] * inv
                kk[t, b + j] = x
                kka[t, b + j] = x * a[t, b + j]
        for j in range(D):
            k[t, j] = k[t, j] * (np.float32(1.0) + (a[t, j] - np.float32(1.0)) * k_a[j])


@njit(fastmath=FASTMATH, cache=True)
def finish_v7(y, n_head, ln_w, ln_b, eps, r, k, v, r_k, g):
    """v7's output of the recurrence, in one pass: per head, y <- (group_norm(y) + (sum r k r_k) v) * g.

    y: (T, D) f32 (updated), n_head: int, ln_w, ln_b: (D,) f32 (ln_x), eps: float,
    r, k, v, g: (T, D) f32, r_k: (D,) f32
    """
    T, D = y.shape
    S = D // n_head
    for t in range(T):
        for h in range(n_head):
            b = h * S
            head_norm(y, t, b, S, ln_w, ln_b, eps, y)
            acc = np.float32(0.0)
            for j in range(S):
                acc += r[t, b + j] * k[t, b + j] * r_k[b + j]
            for j in range(S):
                y[t, b + j] = (y[t, b + j] + acc * v[t, b + j]) * g[t, b + j]
