"""RWKV-7 "Goose": the generalised delta rule, with a value residual to layer 0.

    x_j = xn + dx * maa_j                           for j in r, w, k, v, a, g
    r = Wr x_r,  k = Wk x_k,  v = Wv x_v
    w = exp(-0.606531 sigmoid(w0 + W2 tanh(W1 x_w)))           decay
    a = sigmoid(a0 + A2 A1 x_a)                                in-context learning rate
    g = G2 sigmoid(G1 x_g)                                     output gate
    layer 0: v_first = v;  later: v += (v_first - v) sigmoid(v0 + V2 V1 x_v)
    kk = normalize(k * k_k) per head;  k *= 1 + (a - 1) k_a
    y = group_norm(wkv7(r, w, k, v, kk, kk * a)) + (sum_head r k r_k) v
    x += Wo (y * g)

Channel mix: x += Wv relu(Wk (xn + dx * maa_k))^2 (no receptance).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ..kernels.ops import add_, relu_square_, shift_mix, sigmoid_, tanh_
from ..kernels.wkv import finish_v7, prepare_v7, wkv7
from ..matrix import matmul
from .common import Norm, Sequences, Tensors

_MIXES = ("r", "w", "k", "v", "a", "g")


class TimeMix(NamedTuple):
    maa: np.ndarray         # (6, D) f32: token-shift coefficients of r, w, k, v, a, g
    w0: np.ndarray          # (D,) f32
    w1: object              # (Dw, D) fp32 low-rank matrix
    w2: object              # (D, Dw) fp32 low-rank matrix
    a0: np.ndarray          # (D,) f32
    a1: object              # (Da, D) fp32 low-rank matrix
    a2: object              # (D, Da) fp32 low-rank matrix
    v0: Optional[np.ndarray]  # (D,) f32; None in layer 0
    v1: Optional[object]    # (Dv, D) fp32 low-rank matrix; None in layer 0
    v2: Optional[object]    # (D, Dv) fp32 low-rank matrix; None in layer 0
    g1: object              # (Dg, D) fp32 low-rank matrix
    g2: object              # (D, Dg) fp32 low-rank matrix
    k_k: np.ndarray         # (D,) f32
    k_a: np.ndarray         # (D,) f32
    r_k: np.ndarray         # (D,) f32 (official (H, S), flattened)
    receptance: object      # (D, D) matrix
    key: object             # (D, D) matrix
    value: object           # (D, D) matrix
    output: object          # (D, D) matrix
    ln_x: Norm              # group norm, per head


class ChannelMix(NamedTuple):
    maa: np.ndarray         # (1, D) f32: token-shift coefficient of k
    key: object             # (F, D) matrix
    value: object           # (D, F) matrix


# Low-rank widths a model may lack: a one-layer v7 has no value residual (v1/v2 start at layer 1),
# so no Dv; its v_h buffer is then empty and never used.
OPTIONAL_DIMS = ("Dv",)


class TimeMixWork(NamedTuple):
    """v7's time-mix work buffers for T tokens (each field's default is its shape)."""
    xm: np.ndarray = (6, "T", "D")      # token-shift mixes of r, w, k, v, a, g
    r: np.ndarray = ("T", "D")          # receptance
    k: np.ndarray = ("T", "D")          # key, rescaled in place by prepare_v7
    v: np.ndarray = ("T", "D")          # value, after the value residual
    w_h: np.ndarray = ("T", "Dw")       # tanh(W1 x_w)
    w: np.ndarray = ("T", "D")          # decay
    a_h: np.ndarray = ("T", "Da")       # A1 x_a
    a: np.ndarray = ("T", "D")          # in-context learning rate
    g_h: np.ndarray = ("T", "Dg")       # sigmoid(G1 x_g)
    g: np.ndarray = ("T", "D")          # output gate
    v_h: np.ndarray = ("T", "Dv")       # V1 x_v
    v_z: np.ndarray = ("T", "D")        # V2 V1 x_v, the value residual's gate before v0
    kk: np.ndarray = ("T", "D")         # normalised key
    kka: np.ndarray = ("T", "D")        # kk * a
    y: np.ndarray = ("T", "D")          # wkv7's output, normed, with the bonus, gated
    o: np.ndarray = ("T", "D")          # the output projection


class ChannelMixWork(NamedTuple):
    """v7's channel-mix work buffers for T tokens (each field's default is its shape)."""
    xk: np.ndarray = (1, "T", "D")      # its token-shift mix
    h: np.ndarray = ("T", "F")          # relu(Wk xk)^2
    y: np.ndarray = ("T", "D")          # Wv h


def load_time_mix(t: Tensors, p: str, config, layer: int) -> TimeMix:
    first = layer == 0
    return TimeMix(
        maa=t.stack([p + "x_" + m for m in _MIXES]),
        w0=t.vector(p + "w0"), w1=t.lora(p + "w1"), w2=t.lora(p + "w2"),
        a0=t.vector(p + "a0"), a1=t.lora(p + "a1"), a2=t.lora(p + "a2"),
        v0=None if first else t.vector(p + "v0"),
        v1=None if first else t.lora(p + "v1"),
        v2=None if first else t.lora(p + "v2"),
        g1=t.lora(p + "g1"), g2=t.lora(p + "g2"),
        k_k=t.vector(p + "k_k"), k_a=t.vector(p + "k_a"), r_k=t.vector(p + "r_k"),
        receptance=t.matrix(p + "receptance.weight"),
        key=t.matrix(p + "key.weight"),
        value=t.matrix(p + "value.weight"),
        output=t.matrix(p + "output.weight"),
        ln_x=t.norm(p + "ln_x"),
    )


def time_mix(att: TimeMix, i: int, config, xn, seqs: Sequences, ws: TimeMixWork, x, v_first) -> None:
    """x += the time mix of xn (T, D); advances layer i's att_x and wkv of each sequence.

    v_first: (T, D) f32, the value of layer 0, which writes it for the later layers
    of the same block (the reference's v_first).
    """
    H = config.n_head
    shift_mix(xn, seqs.states, seqs.segs, seqs.at("att_x", i), att.maa, ws.xm)
    xr, xw, xk, xv, xa, xg = ws.xm

    r = matmul(att.receptance, xr, ws.r)
    k = matmul(att.key, xk, ws.k)
    v = matmul(att.value, xv, ws.v)
    tanh_(matmul(att.w1, xw, ws.w_h))
    w = matmul(att.w2, ws.w_h, ws.w)
    a = matmul(att.a2, matmul(att.a1, xa, ws.a_h), ws.a)
    sigmoid_(matmul(att.g1, xg, ws.g_h))
    g = matmul(att.g2, ws.g_h, ws.g)
    first = att.v0 is None
    z = v if first else matmul(att.v2, matmul(att.v1, xv, ws.v_h), ws.v_z)

    # decay, learning rate, value residual and keys from the products above, in one pass
    # (layer 0 passes v and w0 for the unused z and v0: one compiled variant for every layer)
    prepare_v7(w, att.w0, a, att.a0, v, v_first, z, att.w0 if first else att.v0, first, k, att.k_k, att.k_a, H,
               ws.kk, ws.kka)
    y = ws.y
    wkv7(r, w, k, v, ws.kk, ws.kka, seqs.states, seqs.segs, seqs.at("wkv", i), H, y)
    finish_v7(y, H, att.ln_x.weight, att.ln_x.bias, config.group_norm_eps, r, k, v, att.r_k, g)
    add_(x, matmul(att.output, y, ws.o))


def load_channel_mix(t: Tensors, p: str) -> ChannelMix:
    return ChannelMix(maa=t.stack([p + "x_k"]), key=t.matrix(p + "key.weight"),
                      value=t.matrix(p + "value.weight"))


def channel_mix(ffn: ChannelMix, i: int, config, xn, seqs: Sequences, ws: ChannelMixWork, x) -> None:
    """x += Wv relu(Wk xk)^2, xk token-shifted from xn; layer i's ffn_x advanced."""
    shift_mix(xn, seqs.states, seqs.segs, seqs.at("ffn_x", i), ffn.maa, ws.xk)
    h = matmul(ffn.key, ws.xk[0], ws.h)
    relu_square_(h)
    add_(x, matmul(ffn.value, h, ws.y))
