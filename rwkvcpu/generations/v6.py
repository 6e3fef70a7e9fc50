"""RWKV-6: v5.2 with data-dependent token shift and decay, both low-rank.

    dx = shifted(xn) - xn
    m_w, m_k, m_v, m_r, m_g = W2_j tanh(W1 (xn + dx * maa_x))          (five low-rank deltas)
    x_j = xn + dx * (maa_j + m_j)                                          for j in w, k, v, r, g
    decay = exp(-exp(time_decay + D2 tanh(D1 x_w)))                        (per token and channel)
    then as v5.2: r, k, v, g = W x, y = group_norm(wkv5(r, k, v, decay)), x += Wo (y * silu(g))

The channel mix is the one shared with v4 and v5 (common.channel_mix).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..kernels.ops import mix, mix_dynamic, silu_, tanh_, token_shift
from ..kernels.wkv import decay_v6_
from ..matrix import from_parts, matmul
from .common import ChannelMixWork, Norm, Sequences, Tensors, channel_mix, load_channel_mix  # noqa: F401  (re-exported)
from .v5 import heads_output

# Order of the five data-dependent mixes, as in the official time_maa_w2.
_MIXES = ("w", "k", "v", "r", "g")


class TimeMix(NamedTuple):
    maa_x: np.ndarray       # (1, D) f32: mix feeding the low-rank deltas
    maa: np.ndarray         # (5, D) f32: base coefficients of w, k, v, r, g
    maa_w1: object          # (5 E_maa, D) fp32 low-rank matrix
    maa_w2: tuple           # (5,) of (D, E_maa) fp32 low-rank matrices, in _MIXES order
    time_decay: np.ndarray  # (D,) f32: w0
    decay_w1: object        # (E_decay, D) fp32 low-rank matrix
    decay_w2: object        # (D, E_decay) fp32 low-rank matrix
    bonus: np.ndarray       # (D,) f32: u (time_faaaa)
    receptance: object      # (D, D) matrix
    key: object             # (D, D) matrix
    value: object           # (D, D) matrix
    gate: object            # (D, D) matrix
    output: object          # (D, D) matrix
    ln_x: Norm              # group norm, per head


class TimeMixWork(NamedTuple):
    """v6's time-mix work buffers for T tokens (each field's default is its shape)."""
    dx: np.ndarray = ("T", "D")             # the previous token's xn minus this one's
    xx: np.ndarray = (1, "T", "D")          # xn + dx * maa_x: the input of the low-rank deltas
    lora_h: np.ndarray = ("T", "5E_maa")    # tanh(W1 xx), the five mixes' hidden parts side by side
    lora_hj: np.ndarray = (5, "T", "E_maa") # the same, one contiguous block per mix
    delta: np.ndarray = (5, "T", "D")       # the data-dependent mix deltas of w, k, v, r, g
    xm: np.ndarray = (5, "T", "D")          # token-shift mixes of w, k, v, r, g
    decay_h: np.ndarray = ("T", "E_decay")  # tanh(D1 x_w)
    w: np.ndarray = ("T", "D")              # decay
    r: np.ndarray = ("T", "D")              # receptance
    k: np.ndarray = ("T", "D")              # key
    v: np.ndarray = ("T", "D")              # value
    g: np.ndarray = ("T", "D")              # silu(gate)
    y: np.ndarray = ("T", "D")              # wkv5's output, normed and gated
    o: np.ndarray = ("T", "D")              # the output projection


def load_time_mix(t: Tensors, p: str, config, layer: int) -> TimeMix:
    w2 = t.vector(p + "time_maa_w2")
    return TimeMix(
        maa_x=t.stack([p + "time_maa_x"]),
        maa=t.stack([p + "time_maa_" + m for m in _MIXES]),
        maa_w1=t.lora(p + "time_maa_w1"),
        maa_w2=tuple(from_parts("fp32", {"": w2[j]}) for j in range(len(_MIXES))),
        time_decay=t.vector(p + "time_decay"),
        decay_w1=t.lora(p + "time_decay_w1"),
        decay_w2=t.lora(p + "time_decay_w2"),
        bonus=t.vector(p + "bonus"),
        receptance=t.matrix(p + "receptance.weight"),
        key=t.matrix(p + "key.weight"),
        value=t.matrix(p + "value.weight"),
        gate=t.matrix(p + "gate.weight"),
        output=t.matrix(p + "output.weight"),
        ln_x=t.norm(p + "ln_x"),
    )


def time_mix(att: TimeMix, i: int, config, xn, seqs: Sequences, ws: TimeMixWork, x, v_first) -> None:
    """x += the time mix of xn (T, D); advances layer i's att_x and wkv of each sequence.
    (v_first: v7's, unused here.)"""
    T, D = xn.shape
    n_mix, E = len(_MIXES), att.maa_w2[0].shape[1]
    dx = ws.dx
    token_shift(xn, seqs.states, seqs.segs, seqs.at("att_x", i), dx)
    mix(xn, dx, att.maa_x, ws.xx)
    hidden = matmul(att.maa_w1, ws.xx[0], ws.lora_h)
    tanh_(hidden)
    # One contiguous (T, E) block per mix: the products see the same array layout for any T.
    np.copyto(ws.lora_hj, hidden.reshape(T, n_mix, E).transpose(1, 0, 2))
    for j in range(n_mix):
        matmul(att.maa_w2[j], ws.lora_hj[j], ws.delta[j])
    mix_dynamic(xn, dx, att.maa, ws.delta, ws.xm)
    xw, xk, xv, xr, xg = ws.xm
    dh = matmul(att.decay_w1, xw, ws.decay_h)
    tanh_(dh)
    w = matmul(att.decay_w2, dh, ws.w)
    decay_v6_(w, att.time_decay)
    r = matmul(att.receptance, xr, ws.r)
    k = matmul(att.key, xk, ws.k)
    v = matmul(att.value, xv, ws.v)
    g = matmul(att.gate, xg, ws.g)
    silu_(g)
    heads_output(att, i, config, r, k, v, w, g, seqs, ws, x)
