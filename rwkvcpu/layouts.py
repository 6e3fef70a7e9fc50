"""Canonical tensor layout of each RWKV generation, as data.

Whatever the source (official .pth, rwkv.cpp .bin, Hugging Face folder), the
converter writes exactly these tensors, with every transform done once at
convert time (see docs/FORMAT.md for the transform applied to each source
tensor). The loader checks a file against the same list.

Shapes are symbolic: D width, V vocabulary, F channel-mix width, H heads,
S head size (H*S == D), and the low-rank widths of v6 (E_maa, E_decay) and v7
(Dw, Da, Dv, Dg). Every matrix is stored (out, in), so the engine always
computes y = W @ x.

Kinds:
    matrix: large weight matrix; stored at the file's dtype (fp32/fp16/int8/int4).
    vector: per-channel parameter; always fp32.
    lora:   small low-rank matrix; always fp32 (too small to be worth quantizing,
            too sensitive to be worth the error).
    state:  optional initial state from state tuning; always fp32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .config import ModelConfig
from .errors import ModelFormatError

MATRIX, VECTOR, LORA, STATE = "matrix", "vector", "lora", "state"


class TensorSpec(NamedTuple):
    name: str                 # canonical name; per-layer names are relative to "blocks.{i}."
    shape: tuple              # symbolic dims, e.g. ("F", "D")
    kind: str                 # MATRIX, VECTOR, LORA or STATE
    generations: Optional[tuple] = None   # present only in these generations (None: all of the family)
    from_layer: int = 0       # present only in layers >= this
    optional: bool = False    # may be absent (state tuning)


def _vectors(*names):
    return tuple(TensorSpec(n, ("D",), VECTOR) for n in names)


# Shared by every generation.
GLOBAL = (
    TensorSpec("emb.weight", ("V", "D"), MATRIX),       # layer norm ln0 already applied
    TensorSpec("ln_out.weight", ("D",), VECTOR),
    TensorSpec("ln_out.bias", ("D",), VECTOR),
    TensorSpec("head.weight", ("V", "D"), MATRIX),
)

BLOCK_NORMS = _vectors("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")

# Channel mix of v4, v5 and v6: r = sigmoid(Wr xr), k = relu(Wk xk)^2, out = r * (Wv k).
CHANNEL_MIX_V4 = _vectors("ffn.time_maa_k", "ffn.time_maa_r") + (
    TensorSpec("ffn.key.weight", ("F", "D"), MATRIX),
    TensorSpec("ffn.receptance.weight", ("D", "D"), MATRIX),
    TensorSpec("ffn.value.weight", ("D", "F"), MATRIX),
)

# Channel mix of v7: no receptance.
CHANNEL_MIX_V7 = _vectors("ffn.x_k") + (
    TensorSpec("ffn.key.weight", ("F", "D"), MATRIX),
    TensorSpec("ffn.value.weight", ("D", "F"), MATRIX),
)

_ATT_RKVO = (
    TensorSpec("att.receptance.weight", ("D", "D"), MATRIX),
    TensorSpec("att.key.weight", ("D", "D"), MATRIX),
    TensorSpec("att.value.weight", ("D", "D"), MATRIX),
    TensorSpec("att.output.weight", ("D", "D"), MATRIX),
)

_GROUP_NORM = _vectors("att.ln_x.weight", "att.ln_x.bias")

_TIME_STATE = TensorSpec("att.time_state", ("H", "S", "S"), STATE, optional=True)

TIME_MIX_V4 = _vectors(
    "att.time_maa_k", "att.time_maa_v", "att.time_maa_r",
    "att.log_decay",          # -exp(time_decay)
    "att.bonus",              # time_first
) + _ATT_RKVO

TIME_MIX_V5 = _vectors(
    "att.time_maa_k", "att.time_maa_v", "att.time_maa_r",
    "att.decay",              # exp(-exp(time_decay)), per channel
    "att.bonus",              # exp(time_first) (5.0) or time_faaaa (5.1, 5.2), per channel
) + (
    TensorSpec("att.time_maa_g", ("D",), VECTOR, generations=("v5.1", "v5.2")),
    TensorSpec("att.gate.weight", ("D", "D"), MATRIX, generations=("v5.1", "v5.2")),
) + _ATT_RKVO + _GROUP_NORM + (_TIME_STATE,)

TIME_MIX_V6 = _vectors(
    "att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "att.time_maa_v",
    "att.time_maa_r", "att.time_maa_g",
    "att.time_decay",         # w0 of the data-dependent decay, before exp(-exp(.))
    "att.bonus",              # time_faaaa, per channel
) + (
    TensorSpec("att.time_maa_w1", ("5E_maa", "D"), LORA),     # official (D, 5*E_maa), transposed
    TensorSpec("att.time_maa_w2", (5, "D", "E_maa"), LORA),   # official (5, E_maa, D), last two swapped
    TensorSpec("att.time_decay_w1", ("E_decay", "D"), LORA),  # official (D, E_decay), transposed
    TensorSpec("att.time_decay_w2", ("D", "E_decay"), LORA),  # official (E_decay, D), transposed
    TensorSpec("att.gate.weight", ("D", "D"), MATRIX),
) + _ATT_RKVO + _GROUP_NORM + (_TIME_STATE,)

TIME_MIX_V7 = _vectors(
    "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
    "att.w0", "att.a0", "att.k_k", "att.k_a",
    "att.r_k",                # official (H, S), flattened
) + (
    TensorSpec("att.v0", ("D",), VECTOR, from_layer=1),
    # Low-rank pairs, each official (D, r) / (r, D), stored transposed as (out, in).
    TensorSpec("att.w1", ("Dw", "D"), LORA),
    TensorSpec("att.w2", ("D", "Dw"), LORA),
    TensorSpec("att.a1", ("Da", "D"), LORA),
    TensorSpec("att.a2", ("D", "Da"), LORA),
    TensorSpec("att.v1", ("Dv", "D"), LORA, from_layer=1),
    TensorSpec("att.v2", ("D", "Dv"), LORA, from_layer=1),
    TensorSpec("att.g1", ("Dg", "D"), LORA),
    TensorSpec("att.g2", ("D", "Dg"), LORA),
) + _ATT_RKVO + _GROUP_NORM + (_TIME_STATE,)

# The one table every part of rwkvcpu reads: family -> per-block tensors.
BLOCK_TENSORS = {
    "v4": BLOCK_NORMS + TIME_MIX_V4 + CHANNEL_MIX_V4,
    "v5": BLOCK_NORMS + TIME_MIX_V5 + CHANNEL_MIX_V4,
    "v6": BLOCK_NORMS + TIME_MIX_V6 + CHANNEL_MIX_V4,
    "v7": BLOCK_NORMS + TIME_MIX_V7 + CHANNEL_MIX_V7,
}


def resolve_shape(shape: tuple, dims: dict) -> tuple:
    """A symbolic shape in numbers.

    Args:
        shape: ints and symbols, e.g. ("5E_maa", "D") (a leading number multiplies the symbol).
        dims: symbol -> size (ModelConfig.dims(), plus any others the caller uses).

    Example:
        >>> resolve_shape(("5E_maa", "D", 2), {"E_maa": 32, "D": 768})
        (160, 768, 2)
    """
    return tuple(_resolve(d, dims) for d in shape)


def _resolve(dim, dims: dict) -> int:
    if isinstance(dim, int):
        return dim
    # "5E_maa" means 5 * E_maa
    if dim[0].isdigit():
        head = "".join(c for c in dim if c.isdigit())
        return int(head) * dims[dim[len(head):]]
    return dims[dim]


def expected_tensors(config: ModelConfig, include_optional: bool = True) -> dict:
    """All canonical tensors of a model.

    Args:
        config: the model's configuration.
        include_optional: also list optional tensors (state tuning).

    Returns:
        dict name -> (shape tuple of ints, kind, optional flag), in file order.

    Example:
        >>> cfg = ModelConfig("v4", n_layer=1, n_embd=8, vocab_size=16, dim_ffn=32)
        >>> expected_tensors(cfg)["blocks.0.ffn.key.weight"][0]
        (32, 8)
    """
    dims = config.dims()
    out = {}
    try:
        for spec in GLOBAL:
            out[spec.name] = (resolve_shape(spec.shape, dims), spec.kind, spec.optional)
        for i in range(config.n_layer):
            for spec in BLOCK_TENSORS[config.family]:
                if spec.generations is not None and config.generation not in spec.generations:
                    continue
                if i < spec.from_layer or (spec.optional and not include_optional):
                    continue
                shape = resolve_shape(spec.shape, dims)
                out[f"blocks.{i}.{spec.name}"] = (shape, spec.kind, spec.optional)
    except KeyError as e:
        raise ModelFormatError(f"{config.generation} model is missing the dimension {e} in its configuration") from None
    return out
