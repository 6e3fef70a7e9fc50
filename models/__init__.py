"""The small RWKV-7 model shipped with rwkvcpu (installed as rwkvcpu.models).

See models/README.md for its model card.
"""

from pathlib import Path

DEFAULT_MODEL_NAME = "rwkv7-13m-gutenberg.safetensors"


def default_model_path() -> Path:
    """Path of the shipped model file, installed inside the package."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
