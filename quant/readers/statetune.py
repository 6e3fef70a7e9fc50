"""State-tuning files: only `blocks.N.att.time_state`, an initial state per layer.

State tuning (v5, v6, v7) trains the recurrent state a model starts from and
saves just that: one (H, S, S) tensor per layer, in the layout of the official
CUDA kernels, [head, value, key]. Such a file is merged into a model at
conversion (`rwkvcpu convert MODEL DST --state FILE`) and stored as the
canonical `att.time_state` (see quant/canonical.py for the per-generation
orientation).
"""

from __future__ import annotations

import re

from rwkvcpu.errors import ModelFormatError, UnsupportedModelError

from .base import Source

_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


def is_state_file(names) -> bool:
    names = list(names)
    return bool(names) and all(_KEY.match(n) for n in names)


def check_state(state: Source, config) -> list:
    """Validate a state-tuning source against a model; returns its tensor names.

    Args:
        state: an opened source holding only blocks.N.att.time_state.
        config: the model's ModelConfig.

    Returns:
        the names, one per layer.
    """
    names = list(state.tensors())
    if not is_state_file(names):
        other = [n for n in names if not _KEY.match(n)][:2]
        raise ModelFormatError(
            f"{state.path}: not a state-tuning file (expected only blocks.N.att.time_state; "
            f"found {', '.join(other) or 'no tensors'})")
    if config.family == "v4":
        raise UnsupportedModelError(f"{state.path}: v4 models have no matrix state to tune")
    layers = sorted(int(_KEY.match(n).group(1)) for n in names)
    if layers != list(range(config.n_layer)):
        raise ModelFormatError(
            f"{state.path}: holds states for layers {layers[0]}..{layers[-1]} ({len(layers)}), "
            f"the model has {config.n_layer}")
    want = (config.n_head, config.head_size, config.head_size)
    for n in names:
        shape = tuple(state.info(n).shape)
        if shape != want:
            raise ModelFormatError(f"{state.path}: tensor {n} has shape {shape}, expected {want} for this model")
    return names


class WithState(Source):
    """A model source with a state-tuning file's tensors added."""

    def __init__(self, model: Source, state: Source):
        super().__init__(model.path)
        self.model, self.state = model, state
        self.format, self.naming = model.format, model.naming
        self.files = model.files
        self.details = dict(model.details, **{"state file": str(state.path)})
        self.ln0_optional = getattr(model, "ln0_optional", False)
        self._infos = dict(model.tensors())
        for n, info in state.tensors().items():
            self._infos[n] = info

    def group_norm_eps(self, family):
        return self.model.group_norm_eps(family)

    def tokenizer_name(self):
        return self.model.tokenizer_name()

    def _owner(self, name):
        return self.state if name in self.state.tensors() else self.model

    def load(self, name):
        self.info(name)
        return self._owner(name).load(name)

    def release(self, name):
        self._owner(name).release(name)

    def close(self):
        self.model.close()
        self.state.close()
