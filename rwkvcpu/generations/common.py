"""What every RWKV generation shares: the weight containers, the block loop
(`forward`), the v4/v5/v6 channel mix, the sequences of a block and the work
buffers.

A block is T tokens of one or more sequences, in order (`Sequences`: rows
segs[b, 1] .. segs[b, 2] - 1 are sequence b's). Every matrix product is one
call over all T rows (rwkvcpu/matrix.py: matmul), and everything else but the
token shift and the recurrences is elementwise over them; those two run per
sequence, on its own row of the state array, in place. One sequence decoding
is a block of one token; a prompt chunk, or a step of several sequences, is a
longer one. Row t's result does not depend on which other rows share the
block (except through BLAS, see matmul).

A generation module (v4.py, v5.py, v6.py, v7.py) provides:

    TimeMixWork, ChannelMixWork                   its work buffers (NamedTuples; each field's
                                                  default is its symbolic shape)
    OPTIONAL_DIMS (optional)                      shape symbols a model may lack (their buffers are empty)
    load_time_mix(t, prefix, config, layer)       -> its TimeMix NamedTuple
    time_mix(att, i, config, xn, seqs, ws, x, v_first)
                                                  x += TimeMix(xn), layer i's state sections advanced;
                                                  v_first: v7's layer-0 value (unused before v7)
    load_channel_mix(t, prefix)                   -> its ChannelMix NamedTuple
    channel_mix(ffn, i, config, xn, seqs, ws, x)  x += ChannelMix(xn), layer i's ffn_x advanced
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from ..config import LAYER_NORM_EPS
from ..kernels.norms import layer_norm
from ..kernels.ops import add_product_, relu_square_, shift_mix, sigmoid_
from ..layouts import resolve_shape
from ..matrix import dequantize_rows, from_parts, matmul
from ..state import state_layout


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


class Sequences(NamedTuple):
    """The sequences of a block of tokens and their states.

    Example (two sequences: 3 tokens from state row 5, then 1 token from row 0):
        >>> Sequences(pool.data, np.array([[5, 0, 3], [0, 3, 4]]), section_offsets(config))
    """
    states: np.ndarray      # (C, F) f32: one flat state per row (rwkvcpu.state's layout), advanced in place
    segs: np.ndarray        # (B, 3) i64: per sequence its state row, first row and end row in the block
    sections: dict          # section name -> (offset of layer 0, floats per layer): section_offsets(config)

    def at(self, section: str, layer: int) -> int:
        """Where layer `layer`'s part of a state section (e.g. "wkv") starts within a state row."""
        offset, size = self.sections[section]
        return offset + layer * size


def section_offsets(config) -> dict:
    """Section name -> (offset, floats per layer) of a state row, from rwkvcpu.state.state_layout."""
    return {name: (s.offset, math.prod(s.shape[1:])) for name, s in state_layout(config).items()}


class Stream(NamedTuple):
    """The residual stream of a block of T tokens (each field's default is its shape)."""
    x: np.ndarray = ("T", "D")          # the residual stream
    xn: np.ndarray = ("T", "D")         # its layer norm: the input of each mix
    v_first: np.ndarray = ("T", "D")    # v7: layer 0's value, which the later layers lean towards


class ChannelMixWork(NamedTuple):
    """Work buffers of the v4/v5/v6 channel mix for T tokens (each field's default is its shape)."""
    xm: np.ndarray = (2, "T", "D")      # token-shift mixes of k, r
    h: np.ndarray = ("T", "F")          # relu(Wk xk)^2
    r: np.ndarray = ("T", "D")          # sigmoid(Wr xr)
    y: np.ndarray = ("T", "D")          # Wv h


class Work(NamedTuple):
    """Every work buffer of one block of T tokens (see Workspace)."""
    stream: Stream
    att: NamedTuple         # the generation's TimeMixWork
    ffn: NamedTuple         # its ChannelMixWork


class Workspace:
    """A model's work buffers, reused from call to call.

    Each buffer is one flat float32 array, grown to the largest block seen;
    `work(T)` hands out a Work of views shaped for T tokens. The Works of the
    last few block sizes are kept, so decoding step after step makes no new
    arrays. A buffer's contents are only meaningful within one forward call.

    Example:
        >>> ws = Workspace(v7, config)
        >>> ws.work(1).att.r.shape
        (1, 768)
    """

    # Block sizes whose Works are kept (prompts and batches of many sizes: bounded).
    KEEP = 8

    def __init__(self, gen, config):
        self._types = (Stream, gen.TimeMixWork, gen.ChannelMixWork)
        self._dims = {**{d: 0 for d in getattr(gen, "OPTIONAL_DIMS", ())}, **config.dims()}
        self._rows = 0
        self._flat = {}
        self._works = {}

    def work(self, T: int) -> Work:
        """The work buffers for a block of T tokens."""
        w = self._works.get(T)
        if w is None:
            if T > self._rows:
                self._grow(T)
            if len(self._works) >= self.KEEP:
                self._works.clear()
            w = self._works[T] = Work(*(self._views(kind, T) for kind in self._types))
        return w

    def _grow(self, T):
        # Views of the smaller buffers must not be handed out again.
        self._rows, self._works = T, {}
        self._flat = {(kind, f): np.empty(math.prod(self._shape(shape, T)), np.float32)
                      for kind in self._types for f, shape in kind._field_defaults.items()}

    def _views(self, kind, T):
        views = {}
        for f, shape in kind._field_defaults.items():
            shape = self._shape(shape, T)
            views[f] = self._flat[kind, f][:math.prod(shape)].reshape(shape)
        return kind(**views)

    def _shape(self, shape, T) -> tuple:
        return resolve_shape(shape, {**self._dims, "T": T})


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


def forward(gen, config, w: Weights, tokens, seqs: Sequences, work: Work,
            logits: Optional[np.ndarray], rows: Optional[np.ndarray]) -> None:
    """Run a block of tokens of one or more sequences through the model, advancing
    each sequence's state in place.

    Args:
        gen: the generation module.
        config: the model's ModelConfig.
        w: its weights.
        tokens: (T,) int token ids, already checked; sequence b's are
            tokens[seqs.segs[b, 1]:seqs.segs[b, 2]].
        seqs: the block's sequences and their states.
        work: work buffers for T tokens (Workspace.work(T)).
        logits: None (no head needed), or (R, V) f32 for the logits after the block's rows `rows`.
        rows: (R,) int, the rows whose logits are wanted.
    """
    s = work.stream
    x, xn = s.x, s.xn
    for t, tok in enumerate(tokens):
        dequantize_rows(w.emb, int(tok), x[t:t + 1])
    for i, blk in enumerate(w.blocks):
        layer_norm(x, blk.ln1.weight, blk.ln1.bias, LAYER_NORM_EPS, xn)
        gen.time_mix(blk.att, i, config, xn, seqs, work.att, x, s.v_first)
        layer_norm(x, blk.ln2.weight, blk.ln2.bias, LAYER_NORM_EPS, xn)
        gen.channel_mix(blk.ffn, i, config, xn, seqs, work.ffn, x)
    if logits is None:
        return
    last = x[rows]
    layer_norm(last, w.ln_out.weight, w.ln_out.bias, LAYER_NORM_EPS, last)
    matmul(w.head, last, logits)


def load_channel_mix(t: Tensors, prefix: str) -> ChannelMix:
    return ChannelMix(
        maa=t.stack([prefix + "time_maa_k", prefix + "time_maa_r"]),
        key=t.matrix(prefix + "key.weight"),
        receptance=t.matrix(prefix + "receptance.weight"),
        value=t.matrix(prefix + "value.weight"),
    )


def channel_mix(ffn: ChannelMix, i: int, config, xn, seqs: Sequences, ws: ChannelMixWork, x) -> None:
    """x += sigmoid(Wr xr) * (Wv relu(Wk xk)^2), xk/xr token-shifted from xn; layer i's ffn_x advanced."""
    shift_mix(xn, seqs.states, seqs.segs, seqs.at("ffn_x", i), ffn.maa, ws.xm)
    h = matmul(ffn.key, ws.xm[0], ws.h)
    relu_square_(h)
    r = matmul(ffn.receptance, ws.xm[1], ws.r)
    sigmoid_(r)
    y = matmul(ffn.value, h, ws.y)
    add_product_(x, y, r)
