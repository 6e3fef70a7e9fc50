"""RWKV-6 in numpy (float64), one token at a time, on canonical tensors."""

import numpy as np

from .common import channel_mix_v4, matrix_state, run, shifted
from .v5 import heads, silu


def time_mix(config, W, p, i, xn, st, v_first):
    last = shifted(xn, st["att_x"], i)
    dx = last - xn
    E = W[p + "time_maa_w2"].shape[2]
    hidden = np.tanh(W[p + "time_maa_w1"] @ (xn + dx * W[p + "time_maa_x"])).reshape(5, E)
    mixed = {}
    for j, m in enumerate("wkvrg"):
        mixed[m] = xn + dx * (W[p + "time_maa_" + m] + W[p + "time_maa_w2"][j] @ hidden[j])
    lora = W[p + "time_decay_w2"] @ np.tanh(W[p + "time_decay_w1"] @ mixed["w"])
    decay = np.exp(-np.exp(W[p + "time_decay"] + lora))
    r = W[p + "receptance.weight"] @ mixed["r"]
    k = W[p + "key.weight"] @ mixed["k"]
    v = W[p + "value.weight"] @ mixed["v"]
    g = silu(W[p + "gate.weight"] @ mixed["g"])
    return W[p + "output.weight"] @ (heads(config, W, p, r, k, v, decay, st["wkv"][i]) * g)


def forward(config, W, tokens, state=None):
    st = matrix_state(config, W) if state is None else state
    return run(config, W, tokens, time_mix, channel_mix_v4, st), st
