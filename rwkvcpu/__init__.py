"""rwkvcpu: a CPU-first, quantized inference runtime for RWKV language models.

Example:
    >>> import rwkvcpu
    >>> model = rwkvcpu.load("model-int8.safetensors")
    >>> logits, state = model.forward([510, 1563])
    >>> logits, state = model.forward([310], state)
"""

from .config import ModelConfig
from .errors import (ConversionError, ExtraNotInstalledError, InvalidArgumentError, ModelFormatError,
                     NonFiniteError, RwkvCpuError, StateFileError, StateMismatchError, UnsafePickleError,
                     UnsupportedModelError)

__version__ = "0.1.0"

# The engine imports numba and compiles on first use; keep `import rwkvcpu` light.
_LAZY = {
    "load": ".model",
    "Model": ".model",
    "State": ".state",
    "state_layout": ".state",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rwkvcpu' has no attribute {name!r}")


__all__ = ["load", "Model", "State", "state_layout", "ModelConfig", "RwkvCpuError",
           "ModelFormatError", "UnsafePickleError", "UnsupportedModelError",
           "ConversionError", "StateMismatchError", "StateFileError", "InvalidArgumentError",
           "ExtraNotInstalledError", "NonFiniteError"]
