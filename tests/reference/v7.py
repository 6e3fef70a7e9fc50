"""RWKV-7 in numpy (float64), one token at a time, on canonical tensors."""

import numpy as np

from .common import group_norm, layer_norm, matrix_state, run, shifted, sigmoid  # noqa: F401


def time_mix(config, W, p, i, xn, st, v_first):
    H, S = config.n_head, config.head_size
    last = shifted(xn, st["att_x"], i)
    xr, xw, xk, xv, xa, xg = (xn + (last - xn) * W[p + "x_" + m] for m in "rwkvag")
    r = W[p + "receptance.weight"] @ xr
    k = W[p + "key.weight"] @ xk
    v = W[p + "value.weight"] @ xv
    w = np.exp(-0.606531 * sigmoid(W[p + "w0"] + W[p + "w2"] @ np.tanh(W[p + "w1"] @ xw)))
    a = sigmoid(W[p + "a0"] + W[p + "a2"] @ (W[p + "a1"] @ xa))
    g = W[p + "g2"] @ sigmoid(W[p + "g1"] @ xg)
    if i == 0:
        v_first["v"] = v
    else:
        v = v + (v_first["v"] - v) * sigmoid(W[p + "v0"] + W[p + "v2"] @ (W[p + "v1"] @ xv))
    kk = (k * W[p + "k_k"]).reshape(H, S)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), 1e-12)
    k = k * (1 + (a - 1) * W[p + "k_a"])
    r, w, k, v, a = (t.reshape(H, S) for t in (r, w, k, v, a))
    s = st["wkv"][i]                       # [head, value, key]
    s[:] = (s * w[:, None, :] - np.einsum("hij,hj->hi", s, kk)[:, :, None] * (kk * a)[:, None, :]
            + v[:, :, None] * k[:, None, :])
    y = np.einsum("hij,hj->hi", s, r).reshape(-1)
    y = group_norm(y, H, W[p + "ln_x.weight"], W[p + "ln_x.bias"], config.group_norm_eps)
    y = y + ((r * k * W[p + "r_k"].reshape(H, S)).sum(axis=1, keepdims=True) * v).reshape(-1)
    return W[p + "output.weight"] @ (y * g)


def channel_mix(W, p, xn, prev, i):
    last = shifted(xn, prev, i)
    k = np.maximum(W[p + "key.weight"] @ (xn + (last - xn) * W[p + "x_k"]), 0) ** 2
    return W[p + "value.weight"] @ k


def forward(config, W, tokens, state=None):
    st = matrix_state(config, W) if state is None else state
    return run(config, W, tokens, time_mix, channel_mix, st), st
