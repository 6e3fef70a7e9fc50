"""Model configuration: what the converter detected and the engine runs.

The converter detects the generation once and writes this configuration into
the safetensors metadata (all values as strings, see docs/FORMAT.md); the
engine reads it back and never guesses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping

from .errors import ModelFormatError, shown

FORMAT_NAME = "rwkvcpu"
FORMAT_VERSION = 1

# Generations the engine runs. The family (text before the first dot) picks the
# module that computes it; the minor version only changes the tensor list.
GENERATIONS = ("v4", "v5.0", "v5.1", "v5.2", "v6", "v7")

# Group-norm epsilon of ln_x: official v5/v6/v7 checkpoints were trained with
# 64e-5 (1e-5 * head_size_divisor**2 with divisor 8); rwkv.cpp's v5 files use 1e-5.
OFFICIAL_GROUP_NORM_EPS = 64e-5
LAYER_NORM_EPS = 1e-5


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_group_norm_eps(value, error: type = ModelFormatError, source=None) -> float:
    """The group-norm epsilon as a float, refused unless it is a finite positive number.

    One rule for `rwkvcpu convert --eps`, `rwkvcpu.load(group_norm_eps=...)`, a
    Hugging Face config.json and a file's metadata.

    Args:
        value: the epsilon as given.
        error: the RwkvCpuError subclass to raise (InvalidArgumentError for a
            caller's value, ModelFormatError for a file's).
        source: the file it came from, for the message.

    Example:
        >>> check_group_norm_eps(64e-5)
        0.00064
        >>> check_group_norm_eps(-1.0, InvalidArgumentError)
        InvalidArgumentError: group-norm epsilon must be positive (a number such as 64e-5), got -1.0
    """
    where = f"{source}: " if source is not None else ""
    problem = f"{where}group-norm epsilon must be positive (a number such as 64e-5), got {shown(value)}"
    if isinstance(value, bool):
        raise error(problem)
    try:
        eps = float(value)
    except (TypeError, ValueError, OverflowError):
        raise error(problem) from None
    if not math.isfinite(eps) or eps <= 0:
        raise error(problem)
    return eps


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and numerics of one RWKV model.

    Attributes:
        generation: one of GENERATIONS.
        n_layer: number of blocks (L).
        n_embd: model width (D).
        vocab_size: number of tokens (V).
        dim_ffn: channel-mix hidden width (F).
        head_size: channels per head (S); 0 for v4, which has no heads.
        group_norm_eps: epsilon of the per-head group norm ln_x (v5+).
        lora_dims: widths of the low-rank projections, by symbol (v6: "E_maa",
            "E_decay"; v7: "Dw", "Da", "Dv", "Dg"); empty for v4/v5.
        tokenizer: name of the tokenizer ("world", "neox-20b", "bytes", or
            "embedded" when the file's metadata carries a tokenizer.json).
    """

    generation: str
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int
    head_size: int = 0
    group_norm_eps: float = OFFICIAL_GROUP_NORM_EPS
    lora_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tokenizer: str = "world"

    def __post_init__(self):
        if self.generation not in GENERATIONS:
            raise ModelFormatError(
                f"unknown generation {shown(self.generation)}; expected one of {', '.join(GENERATIONS)}"
            )
        for name in ("n_layer", "n_embd", "vocab_size", "dim_ffn"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ModelFormatError(f"{name} must be a positive integer, got {shown(value)}")
        if not _is_int(self.head_size) or self.head_size < 0:
            raise ModelFormatError(f"head_size must be a non-negative integer, got {shown(self.head_size)}")
        if self.family != "v4" and (self.head_size <= 0 or self.n_embd % self.head_size):
            raise ModelFormatError(
                f"head size {self.head_size} does not divide the width {self.n_embd}"
            )
        check_group_norm_eps(self.group_norm_eps, ModelFormatError)
        if not isinstance(self.lora_dims, Mapping) or not all(
                isinstance(k, str) and _is_int(v) and v > 0 for k, v in self.lora_dims.items()):
            raise ModelFormatError(f"low-rank widths must be positive integers, got {shown(self.lora_dims)}")
        if not isinstance(self.tokenizer, str):
            raise ModelFormatError(f"tokenizer must be a name, got {shown(self.tokenizer)}")

    @property
    def family(self) -> str:
        """The generation without its minor version: "v4", "v5", "v6" or "v7"."""
        return self.generation.split(".")[0]

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size if self.head_size else 0

    def dims(self) -> dict:
        """Symbol table for the shapes in rwkvcpu.layouts."""
        d = {"D": self.n_embd, "V": self.vocab_size, "F": self.dim_ffn,
             "H": self.n_head, "S": self.head_size}
        d.update(self.lora_dims)
        return d

    def to_metadata(self) -> dict:
        """The configuration as safetensors metadata (str -> str)."""
        return {
            "generation": self.generation,
            "n_layer": str(self.n_layer),
            "n_embd": str(self.n_embd),
            "vocab_size": str(self.vocab_size),
            "dim_ffn": str(self.dim_ffn),
            "head_size": str(self.head_size),
            "n_head": str(self.n_head),
            "group_norm_eps": repr(float(self.group_norm_eps)),
            "lora_dims": json.dumps(dict(self.lora_dims), sort_keys=True),
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str = "model file") -> "ModelConfig":
        """Rebuild a configuration from safetensors metadata written by to_metadata.

        Raises:
            ModelFormatError: a value is missing, of the wrong type or out of range.
        """
        try:
            lora = json.loads(meta.get("lora_dims", "{}"))
            if not isinstance(lora, dict):
                raise ValueError("lora_dims")
            return cls(
                generation=meta["generation"],
                n_layer=int(meta["n_layer"]),
                n_embd=int(meta["n_embd"]),
                vocab_size=int(meta["vocab_size"]),
                dim_ffn=int(meta["dim_ffn"]),
                head_size=int(meta["head_size"]),
                group_norm_eps=float(meta["group_norm_eps"]),
                lora_dims={k: int(v) for k, v in lora.items()},
                tokenizer=meta.get("tokenizer", "world"),
            )
        except ModelFormatError as e:
            raise ModelFormatError(f"{source}: {e}; re-convert the checkpoint with `rwkvcpu convert`") from None
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            what = e.args[0] if isinstance(e, KeyError) else str(e)
            raise ModelFormatError(
                f"{source}: metadata is missing or has a bad value for {shown(what)}; "
                f"re-convert the checkpoint with `rwkvcpu convert`"
            ) from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
