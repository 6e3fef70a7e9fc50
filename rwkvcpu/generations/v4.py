"""RWKV-4: per-channel exponential decay, normalised by a running denominator.

    xk, xv, xr = token-shift mixes of xn
    k = Wk xk,  v = Wv xv,  r = sigmoid(Wr xr)
    x += Wo (r * wkv4(k, v))            (see kernels/wkv.py: wkv4, with the max-trick)

The channel mix is the one shared with v5 and v6 (common.channel_mix).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..kernels.ops import add_, mix, mul_, sigmoid_, token_shift
from ..kernels.wkv import wkv4
from ..matrix import matmul
from .common import Scratch, Tensors, channel_mix, load_channel_mix  # noqa: F401  (re-exported)


class TimeMix(NamedTuple):
    maa: np.ndarray         # (3, D) f32: token-shift coefficients of k, v, r
    log_decay: np.ndarray   # (D,) f32: -exp(time_decay)
    bonus: np.ndarray       # (D,) f32: time_first
    key: object             # (D, D) matrix
    value: object           # (D, D) matrix
    receptance: object      # (D, D) matrix
    output: object          # (D, D) matrix


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


def time_mix(att: TimeMix, i: int, config, xn, state, ws: Scratch, x) -> None:
    """x += the time mix of xn (T, D); advances layer i's att_x, att_aa, att_bb, att_pp."""
    T, D = xn.shape
    dx = ws.get("dx", (T, D))
    token_shift(xn, state.att_x[i], dx)
    xm = ws.get("xm", (3, T, D))
    mix(xn, dx, att.maa, xm)
    k = matmul(att.key, xm[0], ws.get("k", (T, D)))
    v = matmul(att.value, xm[1], ws.get("v", (T, D)))
    r = matmul(att.receptance, xm[2], ws.get("r", (T, D)))
    sigmoid_(r)
    y = ws.get("y", (T, D))
    wkv4(k, v, att.log_decay, att.bonus, state.att_aa[i], state.att_bb[i], state.att_pp[i], y)
    mul_(y, r)
    add_(x, matmul(att.output, y, ws.get("o", (T, D))))
