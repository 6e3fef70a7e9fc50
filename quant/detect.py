"""Generation detection: which RWKV a checkpoint is, from key names and shapes.

Detection happens once, here, and the result is written into the converted
file's metadata; the engine never guesses.

    v7    att.r_k (or rwkv.cpp's att.x_rwkvag)
    v6    att.time_maa_x
    v5.2  att.ln_x + att.gate, one decay per channel
    v5.1  att.ln_x + att.gate, one decay per head
    v5.0  att.ln_x, no gate
    v4    att.time_first + att.time_decay, no ln_x

Anything else (a transformer, an RWKV variant with extra tensors such as v7's
DeepEmbed or DEA) is refused with a message naming what was found.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

from rwkvcpu.config import OFFICIAL_GROUP_NORM_EPS, ModelConfig, check_group_norm_eps
from rwkvcpu.errors import InvalidArgumentError, ModelFormatError, UnsupportedModelError, shown

from .readers.base import RWKV_CPP, numel

# Key fragments of architectures we are asked to convert but do not run.
FOREIGN_HINTS = (
    ("self_attn", "a transformer"),
    ("q_proj", "a transformer"),
    ("query_key_value", "a transformer (GPT-NeoX style)"),
    ("c_attn", "a transformer (GPT-2 style)"),
    ("attn.qkv", "a transformer"),
    ("mlp.gate_proj", "a transformer (Llama style)"),
    ("wte.weight", "a transformer (GPT-2 style)"),
)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _sample(names, n=3):
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(shown(k)[1:-1] if isinstance(k, str) else shown(k) for k in names[:n]) + more


def refuse_foreign(path, names) -> None:
    """Raise UnsupportedModelError when the keys are not an RWKV state dict."""
    for frag, what in FOREIGN_HINTS:
        hits = [k for k in names if frag in k]
        if hits:
            raise UnsupportedModelError(
                f"{path}: this looks like {what} (found {_sample(hits, 2)}), not RWKV; "
                f"rwkvcpu converts RWKV v4, v5, v6 and v7 only")
    if "emb.weight" not in names:
        raise UnsupportedModelError(
            f"{path}: not an RWKV checkpoint (no emb.weight; found {_sample(sorted(names))})")


def _heads(shape, n_embd):
    """Head count from a per-head tensor's shape: (H, S[, 1]) or (H[, 1, 1])."""
    dims = [d for d in shape]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    n = numel(dims)
    if n <= 0:
        return None
    if n == n_embd and len(dims) >= 2 and dims[0] * dims[1] == n_embd:
        return dims[0]
    if n < n_embd and n_embd % n == 0:
        return n
    return None


def count_layers(path, names) -> int:
    """The number of blocks, from the blocks.N.* tensors the file holds.

    Counted from what is there, never from the largest N: one stray key
    blocks.99999999999.x must not make us walk a hundred billion layers.
    """
    layers = {m.group(1) for k in names for m in [_BLOCK.match(k)] if m}
    if not layers:
        raise ModelFormatError(f"{path}: no blocks.N.* tensors; the checkpoint is empty or not RWKV")
    n = len(layers)
    for i in range(n):
        if f"blocks.{i}.ln1.weight" not in names:
            raise ModelFormatError(f"{path}: tensor blocks.{i}.ln1.weight is missing")
    return n


def detect_generation(names) -> str | None:
    """The generation from key names alone ('v5' when the minor needs shapes)."""
    if "blocks.0.att.r_k" in names or "blocks.0.att.x_rwkvag" in names:
        return "v7"
    if "blocks.0.att.time_maa_x" in names:
        return "v6"
    if "blocks.0.att.ln_x.weight" in names:
        return "v5"
    if "blocks.0.att.time_first" in names and "blocks.0.att.time_decay" in names:
        return "v4"
    return None


class _Found(NamedTuple):
    """What a per-generation dimension rule may look at."""
    path: str
    names: set
    shape: Callable       # tensor name -> shape tuple
    n_embd: int
    rwkv_cpp: bool        # rwkv.cpp naming: low-rank matrices stored transposed


def _v4_dims(found):
    """v4: no heads and no low-rank matrices."""
    return "v4", 0, {}


def _v5_dims(found):
    """v5: the minor from the gate and decay shape, the head count from the decay."""
    path, names, shape, n_embd = found.path, found.names, found.shape, found.n_embd
    decay = shape("blocks.0.att.time_decay")
    per_channel = numel(decay) == n_embd
    if "blocks.0.att.gate.weight" in names:
        generation = "v5.2" if per_channel else "v5.1"
    else:
        generation = "v5.0"
    n_head = _heads(decay, n_embd)
    if n_head is None and "blocks.0.att.time_faaaa" in names:
        n_head = _heads(shape("blocks.0.att.time_faaaa"), n_embd)
    if n_head is None:
        # A per-channel decay stored flat carries no head count; 64 is the
        # head size of every released v5.2 model.
        n_head = n_embd // 64 if n_embd % 64 == 0 else None
    if n_head is None:
        raise ModelFormatError(f"{path}: cannot infer the head count from blocks.0.att.time_decay {decay}")
    return generation, n_embd // n_head, {}


def _v6_dims(found):
    """v6: the head count from time_faaaa, the low-rank widths from the w1 matrices."""
    shape, n_embd, rwkv_cpp = found.shape, found.n_embd, found.rwkv_cpp
    n_head = _heads(shape("blocks.0.att.time_faaaa"), n_embd)
    if n_head is None:
        raise ModelFormatError(
            f"{found.path}: cannot infer the head count from blocks.0.att.time_faaaa {shape('blocks.0.att.time_faaaa')}")
    w1, d1 = shape("blocks.0.att.time_maa_w1"), shape("blocks.0.att.time_decay_w1")
    # rwkv.cpp stores these transposed: (5*E, D) and (E, D).
    lora = {"E_maa": (w1[0] if rwkv_cpp else w1[1]) // 5,
            "E_decay": d1[0] if rwkv_cpp else d1[1]}
    return "v6", n_embd // n_head, lora


def _v7_dims(found):
    """v7: the head size from r_k (H, S), the low-rank widths from the *1 matrices."""
    shape = found.shape
    r_k = shape("blocks.0.att.r_k")
    if len(r_k) != 2 or r_k[0] * r_k[1] != found.n_embd:
        raise ModelFormatError(f"{found.path}: blocks.0.att.r_k has shape {r_k}, expected (heads, head size)")
    lora = {}
    for sym, key in (("Dw", "w1"), ("Da", "a1"), ("Dg", "g1"), ("Dv", "v1")):
        # v1/v2 exist from layer 1 on only; a one-layer model has none.
        for layer in (1, 0):
            name = f"blocks.{layer}.att.{key}"
            if name in found.names:
                s = shape(name)
                lora[sym] = s[0] if found.rwkv_cpp else s[-1]
                break
    return "v7", r_k[1], lora


# family (as detect_generation names it) -> rule giving
# (generation with its minor, head size, low-rank widths).
_DIMS = {"v4": _v4_dims, "v5": _v5_dims, "v6": _v6_dims, "v7": _v7_dims}


def detect(source, *, group_norm_eps=None, tokenizer="world") -> ModelConfig:
    """Detect the generation and dimensions of an opened source.

    Args:
        source: a reader (quant/readers) presenting official or rwkv.cpp names.
        group_norm_eps: override of the ln_x epsilon; None takes the source's
            own (rwkv.cpp v5: 1e-5) or the official 64e-5.
        tokenizer: tokenizer name to record.

    Returns:
        the ModelConfig of the checkpoint.

    Example:
        >>> with GgmlSource("tiny-rwkv-5v2-730K-FP32.bin") as src:
        ...     detect(src).generation
        'v5.2'
    """
    infos = source.tensors()
    names = set(infos)
    path = source.path
    refuse_foreign(path, names)
    gen = detect_generation(names)
    if gen is None:
        raise UnsupportedModelError(
            f"{path}: RWKV-like keys but no known generation (found {_sample(sorted(names), 4)}); "
            f"rwkvcpu runs v4, v5.0, v5.1, v5.2, v6 and v7")

    def shape(name):
        return source.info(name).shape

    n_layer = count_layers(path, names)
    emb = shape("emb.weight")
    if len(emb) != 2:
        raise ModelFormatError(f"{path}: emb.weight has shape {emb}, expected (vocab, width)")
    vocab, n_embd = emb
    ffn_key = shape("blocks.0.ffn.key.weight")
    if len(ffn_key) != 2 or ffn_key[1] != n_embd:
        raise ModelFormatError(
            f"{path}: blocks.0.ffn.key.weight has shape {ffn_key}, expected (F, {n_embd})")
    dim_ffn = ffn_key[0]
    found = _Found(path, names, shape, n_embd, source.naming == RWKV_CPP)
    try:
        gen, head_size, lora = _DIMS[gen](found)
    except (IndexError, ZeroDivisionError) as e:
        # A tensor with fewer dimensions than its generation gives it (the rules index shapes).
        raise ModelFormatError(f"{path}: tensors of block 0 do not have the shapes of a {gen} model "
                               f"({type(e).__name__}: {e})") from None
    family = gen.split(".")[0]
    if group_norm_eps is not None:
        eps = check_group_norm_eps(group_norm_eps, InvalidArgumentError)
    else:
        eps = source.group_norm_eps(family)
        eps = OFFICIAL_GROUP_NORM_EPS if eps is None else check_group_norm_eps(eps, ModelFormatError, path)
    try:
        return ModelConfig(gen, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, dim_ffn=dim_ffn,
                           head_size=head_size, group_norm_eps=float(eps), lora_dims=lora,
                           tokenizer=tokenizer)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e} (from the shapes of its tensors)") from None
