"""What every RWKV generation shares: the weight containers, the block loop,
the v4/v5/v6 channel mix, and the work buffers.

A generation module (v4.py, v5.py, v6.py, v7.py) provides:

    load_time_mix(t, prefix, config, layer) -> its TimeMix NamedTuple
    time_mix(att, layer, config, xn, state, ws, x)      x += TimeMix(xn), state updated
    load_channel_mix(t, prefix) -> its ChannelMix NamedTuple
    channel_mix(ffn, xn, prev, ws, x)                   x += ChannelMix(xn), prev updated

Activations are (T, D) float32 blocks of T tokens: T = 1 when decoding, a
prompt chunk otherwise. Everything except the matrix products (rwkvcpu/matrix.py:
matmul) and the recurrences is elementwise over that block.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from ..config import LAYER_NORM_EPS
from ..kernels.norms import layer_norm
from ..kernels.ops import add_product_, mix, relu_square_, sigmoid_, token_shift
from ..matrix import dequantize_rows, from_parts, matmul


class Norm(NamedTuple):
    weight: np.ndarray      # (D,) f32
    bias: np.ndarray        # (D,) f32


class Block(NamedTuple):
    ln1: Norm
    att: NamedTuple         # the generation's TimeMix
    ln2: Norm
    ffn: NamedTuple         # the generation's ChannelMix


class Weights(NamedTuple):
    emb: object             # (V, D) matrix, ln0 folded in
    blocks: tuple           # (L,) Block
    ln_out: Norm
    head: object            # (V, D) matrix


class ChannelMix(NamedTuple):
    """v4/v5/v6 channel mix: out = sigmoid(Wr xr) * (Wv relu(Wk xk)^2)."""
    maa: np.ndarray         # (2, D) f32: token-shift coefficients of k, r
    key: object             # (F, D) matrix
    receptance: object      # (D, D) matrix
    value: object           # (D, F) matrix


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view: weights are never written, and kernels see one array type for them."""
    a = a.view()
    a.flags.writeable = False
    return a


class Tensors:
    """Typed access to a model's checked tensors (see rwkvcpu.io.check_tensors)."""

    def __init__(self, checked: dict):
        self._t = checked

    def vector(self, name: str) -> np.ndarray:
        return _frozen(np.ascontiguousarray(self._t[name], dtype=np.float32))

    def optional(self, name: str) -> Optional[np.ndarray]:
        return self.vector(name) if name in self._t else None

    def stack(self, names) -> np.ndarray:
        """Several (D,) vectors as one (len(names), D) array (a small copy)."""
        a = np.stack([np.asarray(self._t[n], dtype=np.float32) for n in names])
        a.flags.writeable = False
        return a

    def matrix(self, name: str):
        fmt, parts = self._t[name]
        return from_parts(fmt, {sfx: _frozen(np.ascontiguousarray(a)) for sfx, a in parts.items()})

    def lora(self, name: str):
        """A small fp32 matrix (out, in), as a matrix container for matrix.matmul."""
        return from_parts("fp32", {"": self.vector(name)})

    def norm(self, prefix: str) -> Norm:
        return Norm(self.vector(prefix + ".weight"), self.vector(prefix + ".bias"))


# Cached (name, shape) views in a Scratch; one token needs about 40.
_MAX_VIEWS = 1024


class Scratch:
    """Named float32 work buffers, reused from call to call.

    get(name, shape) returns a C-contiguous view of the buffer of that name,
    growing it when a larger shape is asked for; views are cached, so the
    one-token path makes no new arrays. A buffer's contents are only
    meaningful within one forward call.
    """

    def __init__(self):
        self._bufs = {}
        self._views = {}

    def get(self, name: str, shape: tuple) -> np.ndarray:
        view = self._views.get((name, shape))
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.size < n:
            buf = self._bufs[name] = np.empty(n, np.float32)
            # views of the old, smaller buffer must not be handed out again
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        if len(self._views) >= _MAX_VIEWS:
            # prompts of many different lengths: keep the cache bounded
            self._views.clear()
        view = self._views[name, shape] = buf[:n].reshape(shape)
        return view


def load_weights(gen, config, t: Tensors) -> Weights:
    """The weights of every block, built with the generation module `gen`."""
    blocks = []
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        blocks.append(Block(
            ln1=t.norm(p + "ln1"),
            att=gen.load_time_mix(t, p + "att.", config, i),
            ln2=t.norm(p + "ln2"),
            ffn=gen.load_channel_mix(t, p + "ffn."),
        ))
    return Weights(emb=t.matrix("emb.weight"), blocks=tuple(blocks),
                   ln_out=t.norm("ln_out"), head=t.matrix("head.weight"))


def forward(gen, config, w: Weights, tokens, state, ws: Scratch, logits: Optional[np.ndarray]) -> None:
    """Run a block of tokens through the model, updating `state` in place.

    Args:
        gen: the generation module.
        config: the model's ModelConfig.
        w: its weights.
        tokens: (T,) int token ids, already checked.
        state: the State to advance (modified).
        ws: work buffers.
        logits: None (no head needed), (1, V) for the last token's logits, or
            (T, V) for every token's.
    """
    T, D = len(tokens), config.n_embd
    x = ws.get("x", (T, D))
    for t, tok in enumerate(tokens):
        dequantize_rows(w.emb, int(tok), x[t:t + 1])
    xn = ws.get("xn", (T, D))
    ffn_x = state.ffn_x
    for i, blk in enumerate(w.blocks):
        layer_norm(x, blk.ln1.weight, blk.ln1.bias, LAYER_NORM_EPS, xn)
        gen.time_mix(blk.att, i, config, xn, state, ws, x)
        layer_norm(x, blk.ln2.weight, blk.ln2.bias, LAYER_NORM_EPS, xn)
        gen.channel_mix(blk.ffn, xn, ffn_x[i], ws, x)
    if logits is None:
        return
    rows = x if logits.shape[0] == T else x[T - 1:]
    xo = ws.get("xo", rows.shape)
    layer_norm(rows, w.ln_out.weight, w.ln_out.bias, LAYER_NORM_EPS, xo)
    matmul(w.head, xo, logits)


def load_channel_mix(t: Tensors, prefix: str) -> ChannelMix:
    return ChannelMix(
        maa=t.stack([prefix + "time_maa_k", prefix + "time_maa_r"]),
        key=t.matrix(prefix + "key.weight"),
        receptance=t.matrix(prefix + "receptance.weight"),
        value=t.matrix(prefix + "value.weight"),
    )


def channel_mix(ffn: ChannelMix, xn, prev, ws: Scratch, x) -> None:
    """x += sigmoid(Wr xr) * (Wv relu(Wk xk)^2), xk/xr token-shifted from xn; prev <- last row of xn."""
    T, D = xn.shape
    F = ffn.key.shape[0]
    dx = ws.get("dx", (T, D))
    token_shift(xn, prev, dx)
    xm = ws.get("xm", (2, T, D))
    mix(xn, dx, ffn.maa, xm)
    h = matmul(ffn.key, xm[0], ws.get("ffn_h", (T, F)))
    relu_square_(h)
    r = matmul(ffn.receptance, xm[1], ws.get("ffn_r", (T, D)))
    sigmoid_(r)
    y = matmul(ffn.value, h, ws.get("ffn_y", (T, D)))
    add_product_(x, y, r)
