"""RWKV-5 (5.0, 5.1, 5.2): a matrix-valued state per head.

    xk, xv, xr (, xg) = token-shift mixes of xn
    r = Wr xr,  k = Wk xk,  v = Wv xv
    y = group_norm(wkv5(r, k, v))       (see kernels/wkv.py: wkv5)
    x += Wo (y * silu(Wg xg))           (5.1, 5.2; 5.0 has no gate: x += Wo y)

The minor versions differ only in what the converter stored: 5.0/5.1 have one
decay and bonus per head (repeated over its channels), 5.2 one per channel,
and 5.0's bonus was exp(time_first). The engine sees the same tensors for all.
The channel mix is the one shared with v4 and v6 (common.channel_mix).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ..kernels.norms import group_norm
from ..kernels.ops import add_, mul_, shift_mix, silu_
from ..kernels.wkv import wkv5
from ..matrix import matmul
from .common import ChannelMixWork, Norm, Sequences, Tensors, channel_mix, load_channel_mix  # noqa: F401  (re-exported)


class TimeMix(NamedTuple):
    maa: np.ndarray         # (3 or 4, D) f32: token-shift coefficients of r, k, v (, g)
    decay: np.ndarray       # (1, D) f32: exp(-exp(time_decay)), the same for every token
    bonus: np.ndarray       # (D,) f32: u
    receptance: object      # (D, D) matrix
    key: object             # (D, D) matrix
    value: object           # (D, D) matrix
    gate: Optional[object]  # (D, D) matrix; None in 5.0
    output: object          # (D, D) matrix
    ln_x: Norm              # group norm, per head


class TimeMixWork(NamedTuple):
    """v5's time-mix work buffers for T tokens (each field's default is its shape)."""
    xm: np.ndarray = (4, "T", "D")      # token-shift mixes of r, k, v, g (5.0: the first three)
    r: np.ndarray = ("T", "D")          # receptance
    k: np.ndarray = ("T", "D")          # key
    v: np.ndarray = ("T", "D")          # value
    g: np.ndarray = ("T", "D")          # silu(gate) (5.1, 5.2)
    y: np.ndarray = ("T", "D")          # wkv5's output, normed and gated
    o: np.ndarray = ("T", "D")          # the output projection


def load_time_mix(t: Tensors, p: str, config, layer: int) -> TimeMix:
    has_gate = config.generation != "v5.0"
    names = ["time_maa_r", "time_maa_k", "time_maa_v"] + (["time_maa_g"] if has_gate else [])
    return TimeMix(
        maa=t.stack([p + n for n in names]),
        decay=t.vector(p + "decay").reshape(1, -1),
        bonus=t.vector(p + "bonus"),
        receptance=t.matrix(p + "receptance.weight"),
        key=t.matrix(p + "key.weight"),
        value=t.matrix(p + "value.weight"),
        gate=t.matrix(p + "gate.weight") if has_gate else None,
        output=t.matrix(p + "output.weight"),
        ln_x=t.norm(p + "ln_x"),
    )


def time_mix(att: TimeMix, i: int, config, xn, seqs: Sequences, ws: TimeMixWork, x, v_first) -> None:
    """x += the time mix of xn (T, D); advances layer i's att_x and wkv of each sequence.
    (v_first: v7's, unused here.)"""
    xm = ws.xm if att.gate is not None else ws.xm[:3]
    shift_mix(xn, seqs.states, seqs.segs, seqs.at("att_x", i), att.maa, xm)
    r = matmul(att.receptance, xm[0], ws.r)
    k = matmul(att.key, xm[1], ws.k)
    v = matmul(att.value, xm[2], ws.v)
    g = None
    if att.gate is not None:
        g = matmul(att.gate, xm[3], ws.g)
        silu_(g)
    heads_output(att, i, config, r, k, v, att.decay, g, seqs, ws, x)


def heads_output(att, i, config, r, k, v, decay, g, seqs: Sequences, ws, x) -> None:
    """The part v5 and v6 share: x += Wo (group_norm(wkv5(r, k, v)) [* g]); layer i's wkv advanced.

    r, k, v: (T, D) f32, decay: (T, D) or (1, D) f32, g: (T, D) f32 or None,
    ws: v5's or v6's TimeMixWork (its y and o are used)
    """
    y = ws.y
    wkv5(r, k, v, decay, att.bonus, seqs.states, seqs.segs, seqs.at("wkv", i), config.n_head, y)
    group_norm(y, config.n_head, att.ln_x.weight, att.ln_x.bias, config.group_norm_eps, y)
    if g is not None:
        mul_(y, g)
    add_(x, matmul(att.output, y, ws.o))
