"""Shared pieces of the numpy references: norms, dequantized weights, the block loop.

The references compute in float64, one token at a time, straight from the
formulas; they favour clarity over speed and are never used by the engine.
"""

import numpy as np

from rwkvcpu.layouts import MATRIX, expected_tensors
from rwkvcpu.formats import SUFFIXES, detect_stored_format

LN_EPS = 1e-5


def layer_norm(x, w, b, eps=LN_EPS):
    return (x - x.mean()) / np.sqrt(x.var() + eps) * w + b


def group_norm(x, n_head, w, b, eps):
    h = x.reshape(n_head, -1)
    h = (h - h.mean(axis=1, keepdims=True)) / np.sqrt(h.var(axis=1, keepdims=True) + eps)
    return h.reshape(-1) * w + b


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class RoundedInputs:
    """A dequantized int8/int4 matrix whose products first round the vector they multiply to int8
    levels per weight group (step max|x over the group| / 127), as rwkvcpu's int8/int4 kernels do:
    W @ x here is W @ (rint(x / step) * step)."""

    def __init__(self, w, group):
        self.w, self.group, self.shape = w, group, w.shape

    def __matmul__(self, x):
        g = np.asarray(x, np.float64).reshape(-1, self.group)
        step = np.abs(g).max(axis=1, keepdims=True) / 127.0
        levels = np.rint(np.divide(g, step, out=np.zeros_like(g), where=step > 0))
        return self.w @ (levels * step).reshape(-1)


def dense_weights(config, stored, round_activations=False):
    """Canonical tensors as float64, matrices dequantized from their stored parts.

    stored: name -> array, as in a model file ("W", "W.scale", "W.min" for matrices).
    round_activations: int8/int4 matrices (but the embedding, which is looked up) as
        RoundedInputs, to follow the engine's int8 activations.
    """
    out = {}
    for name, (shape, kind, optional) in expected_tensors(config).items():
        if kind == MATRIX:
            parts = {sfx: stored[name + sfx] for sfx in SUFFIXES if name + sfx in stored}
            fmt = detect_stored_format(parts)
            out[name] = fmt.dequantize(parts).astype(np.float64).reshape(shape)
            if round_activations and fmt.name in ("int8", "int4") and name != "emb.weight":
                out[name] = RoundedInputs(out[name], fmt.group)
        elif name in stored:
            out[name] = np.asarray(stored[name], dtype=np.float64)
    return out


def run(config, W, tokens, time_mix, channel_mix, state):
    """Logits (T, V) after each token; `state` (dict of per-layer arrays) is advanced in place."""
    logits = []
    for tok in tokens:
        x = W["emb.weight"][tok].copy()
        v_first = {}
        for i in range(config.n_layer):
            p = f"blocks.{i}."
            xn = layer_norm(x, W[p + "ln1.weight"], W[p + "ln1.bias"])
            x = x + time_mix(config, W, p + "att.", i, xn, state, v_first)
            xn = layer_norm(x, W[p + "ln2.weight"], W[p + "ln2.bias"])
            x = x + channel_mix(W, p + "ffn.", xn, state["ffn_x"], i)
        x = layer_norm(x, W["ln_out.weight"], W["ln_out.bias"])
        logits.append(W["head.weight"] @ x)
    return np.array(logits)


def shifted(xn, prev, i):
    """The previous token's input (prev[i]) and remember this one."""
    last = prev[i].copy()
    prev[i] = xn
    return last


def channel_mix_v4(W, p, xn, prev, i):
    last = shifted(xn, prev, i)
    xk = xn + (last - xn) * W[p + "time_maa_k"]
    xr = xn + (last - xn) * W[p + "time_maa_r"]
    r = sigmoid(W[p + "receptance.weight"] @ xr)
    k = np.maximum(W[p + "key.weight"] @ xk, 0) ** 2
    return r * (W[p + "value.weight"] @ k)


def matrix_state(config, tensors=None):
    """Zero state for v5/v6/v7 (att_x, wkv, ffn_x), or the state-tuned one."""
    L, D, H, S = config.n_layer, config.n_embd, config.n_head, config.head_size
    st = {"att_x": np.zeros((L, D)), "wkv": np.zeros((L, H, S, S)), "ffn_x": np.zeros((L, D))}
    for i in range(L):
        if tensors is not None and f"blocks.{i}.att.time_state" in tensors:
            st["wkv"][i] = tensors[f"blocks.{i}.att.time_state"]
    return st
