"""RWKV-5 (5.0, 5.1, 5.2) in numpy (float64), one token at a time, on canonical tensors."""

import numpy as np

from .common import channel_mix_v4, group_norm, matrix_state, run, shifted


def silu(x):
    return x / (1.0 + np.exp(-x))


def heads(config, W, p, r, k, v, decay, s):
    """y = group_norm(per head: r @ (u * k v^T + s)); s <- decay * s + k v^T (s: [head, key, value])."""
    H, S = config.n_head, config.head_size
    r, k, v = (a.reshape(H, S) for a in (r, k, v))
    u, w = W[p + "bonus"].reshape(H, S), decay.reshape(H, S)
    kv = k[:, :, None] * v[:, None, :]
    y = np.einsum("hi,hij->hj", r, u[:, :, None] * kv + s)
    s[:] = w[:, :, None] * s + kv
    return group_norm(y.reshape(-1), H, W[p + "ln_x.weight"], W[p + "ln_x.bias"], config.group_norm_eps)


def time_mix(config, W, p, i, xn, st, v_first):
    last = shifted(xn, st["att_x"], i)
    mixed = {m: xn + (last - xn) * W[p + "time_maa_" + m] for m in "rkvg" if p + "time_maa_" + m in W}
    r = W[p + "receptance.weight"] @ mixed["r"]
    k = W[p + "key.weight"] @ mixed["k"]
    v = W[p + "value.weight"] @ mixed["v"]
    y = heads(config, W, p, r, k, v, W[p + "decay"], st["wkv"][i])
    if "g" in mixed:
        y = y * silu(W[p + "gate.weight"] @ mixed["g"])
    return W[p + "output.weight"] @ y


def forward(config, W, tokens, state=None):
    st = matrix_state(config, W) if state is None else state
    return run(config, W, tokens, time_mix, channel_mix_v4, st), st
