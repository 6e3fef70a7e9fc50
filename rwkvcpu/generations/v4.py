"""RWKV-4: per-channel exponential decay, normalised by a running denominator.

    xk, xv, xr = token-shift mixes of xn
    k = Wk xk,  v = Wv xv,  r = sigmoid(Wr xr)
    x += Wo (r * wkv4(k, v))            (see kernels/wkv.py: wkv4, with the max-trick)

The channel mix is the one shared with v5 and v6 (common.channel_mix).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..kernels.ops import add_, mul_, shift_mix, sigmoid_
from ..kernels.wkv import wkv4
from ..matrix import matmul
from .common import ChannelMixWork, Sequences, Tensors, channel_mix, load_channel_mix  # noqa: F401  (re-exported)


class TimeMix(NamedTuple):
    maa: np.ndarray         # (3, D) f32: token-shift coefficients of k, v, r
    log_decay: np.ndarray   # (D,) f32: -exp(time_decay)
    bonus: np.ndarray       # (D,) f32: time_first
    key: object             # (D, D) matrix
    value: object           # (D, D) matrix
    receptance: object      # (D, D) matrix
    output: object          # (D, D) matrix


class TimeMixWork(NamedTuple):
    """v4's time-mix work buffers for T tokens (each field's default is its shape)."""
    xm: np.ndarray = (3, "T", "D")      # token-shift mixes of k, v, r
    k: np.ndarray = ("T", "D")          # key
    v: np.ndarray = ("T", "D")          # value
    r: np.ndarray = ("T", "D")          # sigmoid(receptance)
    y: np.ndarray = ("T", "D")          # wkv4's output, then r * it
    o: np.ndarray = ("T", "D")          # the output projection


def load_time_mix(t: Tensors, p: str, config, layer: int) -> TimeMix:
    return TimeMix(
        maa=t.stack([p + "time_maa_k", p + "time_maa_v", p + "time_maa_r"]),
        log_decay=t.vector(p + "log_decay"),
        bonus=t.vector(p + "bonus"),
        key=t.matrix(p + "key.weight"),
        value=t.matrix(p + "value.weight"),
        receptance=t.matrix(p + "receptance.weight"),
        output=t.matrix(p + "output.weight"),
    )


def time_mix(att: TimeMix, i: int, config, xn, seqs: Sequences, ws: TimeMixWork, x, v_first) -> None:
    """x += the time mix of xn (T, D); advances layer i's att_x, att_aa, att_bb, att_pp of each sequence.
    (v_first: v7's, unused here.)"""
    shift_mix(xn, seqs.states, seqs.segs, seqs.at("att_x", i), att.maa, ws.xm)
    k = matmul(att.key, ws.xm[0], ws.k)
    v = matmul(att.value, ws.xm[1], ws.v)
    r = matmul(att.receptance, ws.xm[2], ws.r)
    sigmoid_(r)
    y = ws.y
    wkv4(k, v, att.log_decay, att.bonus, seqs.states, seqs.segs,
         seqs.at("att_aa", i), seqs.at("att_bb", i), seqs.at("att_pp", i), y)
    mul_(y, r)
    add_(x, matmul(att.output, y, ws.o))
