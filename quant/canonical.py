"""From a source's tensors to the canonical layout: the transforms, as data.

Every canonical tensor (rwkvcpu/layouts.py) comes from one source tensor
through a short chain of named operations. A tensor without a rule here is
taken unchanged from the source tensor of the same name; a vector whose source
has extra unit dimensions (official (1, 1, D)) is squeezed. Everything else
must match the canonical shape exactly, or conversion stops naming the tensor.

Two rule tables exist, one per source naming: OFFICIAL (BlinkDL's .pth keys,
also reached by the Hugging Face readers after renaming) and RWKV_CPP
(rwkv.cpp already applied some transforms: its rules undo or skip them).
docs/FORMAT.md lists the same transforms for readers of the file format.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import numpy as np

from rwkvcpu.checks import check_finite
from rwkvcpu.config import LAYER_NORM_EPS, ModelConfig
from rwkvcpu.errors import ModelFormatError, UnsupportedModelError, shown
from rwkvcpu.layouts import LORA, MATRIX, STATE, VECTOR, expected_tensors

from rwkvcpu import formats
from .readers.base import OFFICIAL, RWKV_CPP, numel


class Rule(NamedTuple):
    target: str                       # canonical name; per-layer names relative to "blocks.{i}."
    source: str                       # source key, same convention
    ops: tuple = ()                   # names in OPS, applied left to right
    arg: Optional[int] = None         # argument of an op that takes one (row of x_rwkvag)
    generations: Optional[tuple] = None   # only for these generations


# ---------------------------------------------------------------- operations
# Each op: (array, context) -> array. Exponentials run in float64 and round
# once to float32, so the stored value is the correctly rounded transform.

class Context(NamedTuple):
    config: ModelConfig
    source: object            # the reader, for ops that need a second tensor
    name: str                 # canonical name being built (for messages)
    arg: Optional[int] = None     # the rule's argument, for an op that takes one


def _one_minus(x, ctx):
    return np.float32(1.0) - x.astype(np.float32)


def _neg_exp(x, ctx):
    return (-np.exp(x.astype(np.float64))).astype(np.float32)


def _exp_neg_exp(x, ctx):
    return np.exp(-np.exp(x.astype(np.float64))).astype(np.float32)


def _exp(x, ctx):
    return np.exp(x.astype(np.float64)).astype(np.float32)


def _per_channel(x, ctx):
    """One value per head (5.0/5.1) repeated over its S channels, or one per channel."""
    cfg = ctx.config
    n = x.size
    if n == cfg.n_head:
        return np.repeat(x.reshape(-1), cfg.head_size)
    if n == cfg.n_embd:
        return x.reshape(-1)
    raise ModelFormatError(
        f"{ctx.source.path}: {ctx.name} source has {n} values; expected {cfg.n_head} (per head) "
        f"or {cfg.n_embd} (per channel)")


def _transpose(x, ctx):
    if x.ndim != 2:
        raise ModelFormatError(f"{ctx.source.path}: {ctx.name} source has shape {x.shape}, expected a matrix")
    return x.T


def _swap_last2(x, ctx):
    return np.swapaxes(x, -1, -2)


def _take6(x, ctx):
    """Row `ctx.arg` of rwkv.cpp's x_rwkvag, the six v7 token-shift vectors stacked."""
    d = ctx.config.n_embd
    if x.size != 6 * d:
        raise ModelFormatError(f"{ctx.source.path}: x_rwkvag has shape {x.shape}, expected 6 x {d} values")
    return x.reshape(6, d)[ctx.arg]


def _fold_ln0(x, ctx):
    """emb = layer_norm(emb, ln0): the engine then skips ln0 on every token."""
    src = ctx.source
    names = src.tensors()
    if "blocks.0.ln0.weight" not in names and getattr(src, "ln0_optional", False):
        return x
    w = src.load("blocks.0.ln0.weight")
    b = src.load("blocks.0.ln0.bias")
    for name, v in (("blocks.0.ln0.weight", w), ("blocks.0.ln0.bias", b)):
        if v.size != x.shape[-1]:
            raise ModelFormatError(f"{src.path}: tensor {name} has shape {v.shape}, expected "
                                   f"{x.shape[-1]} values (the width)")
        check_finite(v, src.path, name)
    return layer_norm_rows(x, w.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64))


def layer_norm_rows(x, w, b, eps=LAYER_NORM_EPS, chunk=4096):
    """Row-wise layer norm in float64, rounded once to float32.

    Args:
        x: (rows, D) array.
        w, b: (D,) weight and bias.

    Returns:
        (rows, D) float32.
    """
    out = np.empty(x.shape, np.float32)
    for r0 in range(0, x.shape[0], chunk):
        blk = np.asarray(x[r0:r0 + chunk], dtype=np.float64)
        mu = blk.mean(axis=1, keepdims=True)
        var = ((blk - mu) ** 2).mean(axis=1, keepdims=True)
        out[r0:r0 + chunk] = (blk - mu) / np.sqrt(var + eps) * w + b
    return out


def _state_kv(x, ctx):
    """Official time_state is [head, value, key]; v5/v6 run [head, key, value]."""
    if x.ndim != 3:
        raise ModelFormatError(f"{ctx.source.path}: {ctx.name} source has shape {x.shape}, expected (H, S, S)")
    return np.swapaxes(x, 1, 2)


OPS: dict = {
    "one_minus": _one_minus,
    "neg_exp": _neg_exp,
    "exp_neg_exp": _exp_neg_exp,
    "exp": _exp,
    "per_channel": _per_channel,
    "transpose": _transpose,
    "swap_last2": _swap_last2,
    "take6": _take6,
    "fold_ln0": _fold_ln0,
    "state_kv": _state_kv,
}

# ---------------------------------------------------------------- rule tables

_GLOBAL = (Rule("emb.weight", "emb.weight", ("fold_ln0",)),)

_MIX_V4 = tuple(Rule(f"{part}.time_maa_{c}", f"{part}.time_mix_{c}", ("one_minus",))
                for part, cs in (("att", "kvr"), ("ffn", "kr")) for c in cs)

OFFICIAL_RULES = {
    "v4": _MIX_V4 + (
        Rule("att.log_decay", "att.time_decay", ("neg_exp",)),
        Rule("att.bonus", "att.time_first"),
    ),
    "v5": _MIX_V4 + (
        Rule("att.time_maa_g", "att.time_mix_g", ("one_minus",)),
        Rule("att.decay", "att.time_decay", ("exp_neg_exp", "per_channel")),
        Rule("att.bonus", "att.time_first", ("exp", "per_channel"), generations=("v5.0",)),
        Rule("att.bonus", "att.time_faaaa", ("per_channel",), generations=("v5.1", "v5.2")),
        Rule("att.time_state", "att.time_state", ("state_kv",)),
    ),
    "v6": (
        Rule("att.time_maa_w1", "att.time_maa_w1", ("transpose",)),
        Rule("att.time_maa_w2", "att.time_maa_w2", ("swap_last2",)),
        Rule("att.time_decay_w1", "att.time_decay_w1", ("transpose",)),
        Rule("att.time_decay_w2", "att.time_decay_w2", ("transpose",)),
        Rule("att.bonus", "att.time_faaaa"),
        Rule("att.time_state", "att.time_state", ("state_kv",)),
    ),
    "v7": tuple(Rule(f"att.{n}", f"att.{n}", ("transpose",))
                for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")),
}

# rwkv.cpp's converter already stored v4's decay as -exp(w), v5's as
# exp(-exp(w)) and 5.0's first as exp(u), transposed the low-rank matrices of
# v6 and v7, and concatenated v7's token-shift vectors into x_rwkvag.
_RWKV_CPP_OVERRIDES = {
    "v4": (Rule("att.log_decay", "att.time_decay"),),
    "v5": (
        Rule("att.decay", "att.time_decay", ("per_channel",)),
        Rule("att.bonus", "att.time_first", ("per_channel",), generations=("v5.0",)),
    ),
    "v6": tuple(Rule(f"att.{n}", f"att.{n}")
                for n in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2")),
    "v7": tuple(Rule(f"att.{n}", f"att.{n}") for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"))
    + tuple(Rule(f"att.x_{c}", "att.x_rwkvag", ("take6",), arg=i) for i, c in enumerate("rwkvag")),
}


def _merge(base, overrides):
    out = {}
    for fam in base:
        rules = {(r.target, r.generations): r for r in base[fam]}
        for r in overrides.get(fam, ()):
            rules[(r.target, r.generations)] = r
        out[fam] = tuple(rules.values())
    return out


RULES = {
    OFFICIAL: OFFICIAL_RULES,
    RWKV_CPP: _merge(OFFICIAL_RULES, _RWKV_CPP_OVERRIDES),
}

# Source tensors read but not stored: ln0 is folded into emb; v7's layer-0
# v0/v1/v2 exist in official checkpoints but layer 0 has no value residual.
CONSUMED = ("blocks.0.ln0.weight", "blocks.0.ln0.bias")
UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

# Extras of RWKV-7 variants, by a pattern of their keys: v7b adds Deep Embedding
# Attention (blocks.N.qkv.*: qq, k1, k2, k_emb, v_emb, lnq, ...) on top of v7a's
# DeepEmbed (blocks.N.ffn.s_emb, s_emb_x, s0, s1, s2). v7b is checked first.
V7_EXTRAS = ((re.compile(r"^blocks\.\d+\.qkv\."), "DEA attention (RWKV-7b)"),
             (re.compile(r"^blocks\.\d+\.ffn\.(s_emb|s_emb_x|s0|s1|s2)(\.|$)"), "DeepEmbed (RWKV-7a)"))


def rule_for(naming: str, config: ModelConfig, name: str) -> tuple:
    """(Rule, layer prefix) producing canonical `name` from a source of `naming`."""
    prefix, rel = "", name
    if name.startswith("blocks."):
        i = name.split(".", 2)[1]
        prefix, rel = f"blocks.{i}.", name.split(".", 2)[2]
    rules = _GLOBAL if not prefix else RULES[naming].get(config.family, ())
    for r in rules:
        if r.target == rel and (r.generations is None or config.generation in r.generations):
            return r, prefix
    return Rule(rel, rel), prefix


# ---------------------------------------------------------------- the plan

class Planned(NamedTuple):
    name: str            # canonical name
    kind: str            # MATRIX, VECTOR, LORA or STATE
    shape: tuple         # canonical float shape
    fmt: str             # storage format name (rwkvcpu/formats.py); "fp32" for non-matrices
    parts: dict          # suffix -> (safetensors dtype, shape)
    source: str          # source key it is read from
    rule: Rule


def plan(source, config: ModelConfig, dtype: str) -> list:
    """Every tensor to write, with its storage, before any data is read.

    Checks that each needed source tensor exists and has a plausible size, and
    that the source holds nothing this generation does not use.

    Args:
        source: an opened reader.
        config: its detected configuration.
        dtype: "fp32", "fp16", "int8" or "int4".

    Returns:
        list of Planned, in canonical order.
    """
    formats.get_format(dtype)
    infos = source.tensors()
    path = source.path
    out, used = [], set(CONSUMED) | set(UNUSED)
    for name, (shape, kind, optional) in expected_tensors(config).items():
        rule, prefix = rule_for(source.naming, config, name)
        src_name = prefix + rule.source
        if src_name not in infos:
            if optional:
                continue
            # Name the canonical tensor only where the source calls it something else.
            for_what = f" for {name} {shape}" if src_name != name else f", with shape {shape}"
            raise ModelFormatError(
                f"{path}: tensor {src_name} is missing (a {config.generation} model needs it{for_what})")
        used.add(src_name)
        src_shape = infos[src_name].shape
        _check_size(path, src_name, src_shape, rule, shape, kind, config)
        if kind == MATRIX:
            fmt = formats.format_for_matrix(dtype, shape)
            parts = formats.get_format(fmt).parts(shape)
        else:
            fmt, parts = "fp32", {"": ("F32", shape)}
        out.append(Planned(name, kind, shape, fmt, parts, src_name, rule))
    extras = [k for k in infos if k not in used]
    if extras:
        _refuse_extras(path, config, extras)
    return out


def _check_size(path, src_name, src_shape, rule, shape, kind, config):
    if kind in (MATRIX, LORA, STATE) and not rule.ops and tuple(src_shape) != tuple(shape):
        raise ModelFormatError(f"{path}: tensor {src_name} has shape {tuple(src_shape)}, expected {shape}")
    n_src, n_dst = numel(src_shape), numel(shape)
    if "take6" in rule.ops:
        n_src //= 6
    if "per_channel" in rule.ops and n_src in (config.n_head, config.n_embd):
        return
    if n_src != n_dst:
        raise ModelFormatError(
            f"{path}: tensor {src_name} has shape {tuple(src_shape)}, expected {n_dst} values "
            f"(canonical {shape})")


def _refuse_extras(path, config, extras):
    if config.family == "v7":
        for pattern, what in V7_EXTRAS:
            hits = [k for k in extras if pattern.match(k)]
            if hits:
                raise UnsupportedModelError(
                    f"{path}: RWKV-7 with {what} is not supported (found {', '.join(shown(k)[1:-1] for k in hits[:2])}); "
                    f"rwkvcpu runs the plain RWKV-7 architecture")
    listed = ", ".join(shown(k)[1:-1] for k in extras[:3]) + (f" and {len(extras) - 3} more" if len(extras) > 3 else "")
    raise UnsupportedModelError(
        f"{path}: {config.generation} checkpoint has tensors rwkvcpu does not know ({listed}); "
        f"it is a variant rwkvcpu does not run")


def build(source, config: ModelConfig, p: Planned) -> np.ndarray:
    """The canonical float32 value of one planned tensor.

    Raises:
        ModelFormatError: the stored tensor holds NaN or infinite values, or its
            transform (e.g. exp) overflows; named, in one line, before anything is written.
    """
    # Overflow (in reading, e.g. bf16 or fp16 to fp32, or in a transform) is found by
    # check_finite and named in words; numpy's warning would say less.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = source.load(p.source)
        check_finite(x, source.path, p.source)
        ctx = Context(config, source, p.name, p.rule.arg)
        for op in p.rule.ops:
            x = OPS[op](x, ctx)
    if x.shape != p.shape:
        if p.kind == VECTOR and x.size == int(np.prod(p.shape)):
            # Official vectors carry unit dimensions, e.g. time_mix_k (1, 1, D).
            x = x.reshape(p.shape)
        else:
            raise ModelFormatError(
                f"{source.path}: tensor {p.source} gives shape {x.shape} after {', '.join(p.rule.ops) or 'no transform'}, "
                f"expected {p.shape} for {p.name}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if p.rule.ops:
        check_finite(x, source.path, p.source, after=", ".join(p.rule.ops))
    return x


def store(p: Planned, x: np.ndarray) -> dict:
    """The stored parts of one canonical tensor: {full name: array}."""
    if p.kind == MATRIX:
        parts = formats.get_format(p.fmt).quantize(x)
    else:
        parts = {"": x}
    return {p.name + suffix: arr for suffix, arr in parts.items()}

