"""RWKV-4 in numpy (float64), one token at a time, on canonical tensors."""

import numpy as np

from .common import channel_mix_v4, run, shifted, sigmoid


def time_mix(config, W, p, i, xn, st, v_first):
    last = shifted(xn, st["att_x"], i)
    xk, xv, xr = (xn + (last - xn) * W[p + "time_maa_" + m] for m in "kvr")
    k = W[p + "key.weight"] @ xk
    v = W[p + "value.weight"] @ xv
    r = sigmoid(W[p + "receptance.weight"] @ xr)
    w, u = W[p + "log_decay"], W[p + "bonus"]
    aa, bb, pp = st["aa"][i], st["bb"][i], st["pp"][i]
    # out = (aa e^pp + v e^(u+k)) / (bb e^pp + e^(u+k)), with the exponents kept relative to their max
    q = np.maximum(pp, u + k)
    e1, e2 = np.exp(pp - q), np.exp(u + k - q)
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
    q = np.maximum(pp + w, k)
    e1, e2 = np.exp(pp + w - q), np.exp(k - q)
    st["aa"][i], st["bb"][i], st["pp"][i] = e1 * aa + e2 * v, e1 * bb + e2, q
    return W[p + "output.weight"] @ (r * wkv)


def initial_state(config, tensors=None):
    L, D = config.n_layer, config.n_embd
    return {"att_x": np.zeros((L, D)), "aa": np.zeros((L, D)), "bb": np.zeros((L, D)),
            "pp": np.full((L, D), -1e38), "ffn_x": np.zeros((L, D))}


def forward(config, W, tokens, state=None):
    st = initial_state(config) if state is None else state
    return run(config, W, tokens, time_mix, channel_mix_v4, st), st
