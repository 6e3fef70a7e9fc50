"""Checkpoint readers, one module per source format, and the one dispatch point.

`open_source(path)` looks at the file's first bytes (never its extension:
rwkv.cpp and Hugging Face both use `.bin`) and returns a reader presenting the
tensors lazily under official or rwkv.cpp names.
"""

from __future__ import annotations

from pathlib import Path

from rwkvcpu.errors import ModelFormatError

from .base import OFFICIAL, RWKV_CPP, Source, TensorInfo, open_checkpoint_file  # noqa: F401


def _open_file(path: Path) -> Source:
    from . import ggml, gguf_file, pth, safetensors_file

    with open_checkpoint_file(path) as f:
        head = f.read(16)
    if ggml.is_ggml(head):
        return ggml.GgmlSource(path)
    if gguf_file.is_gguf(head):
        return gguf_file.GgufSource(path)
    if head.startswith(pth.ZIP_MAGIC):
        return pth.PthSource(path)
    if head.startswith(pth.LEGACY_MAGIC[:3]):
        raise ModelFormatError(
            f"{path}: legacy (torch < 1.6) checkpoint format; re-save it with a current torch.save")
    if safetensors_file.is_safetensors(head):
        return safetensors_file.SafetensorsSource(path)
    raise ModelFormatError(
        f"{path}: unrecognised file (starts with {head[:8].hex()}); expected an official .pth, "
        f"an rwkv.cpp .bin, a llama.cpp .gguf, a .safetensors file or a Hugging Face folder")


def open_source(path) -> Source:
    """Open any supported checkpoint for lazy reading.

    Args:
        path: an official .pth (or pytorch_model.bin), an rwkv.cpp .bin, a
            llama.cpp .gguf (rwkv6, rwkv7), a .safetensors file, or a Hugging
            Face model folder.

    Returns:
        a Source; close it (or use it as a context manager) when done.

    Example:
        >>> with open_source("tiny-rwkv-7v0-834K-FP16.bin") as src:
        ...     src.tensors()["emb.weight"].shape
        (256, 64)
    """
    from . import hf

    p = Path(path)
    if not p.exists():
        parent = p.parent
        if not parent.exists():
            raise ModelFormatError(f"{p}: no such file (directory {parent} does not exist)")
        raise ModelFormatError(f"{p}: no such file or directory")
    if p.is_dir():
        return hf.open_folder(p, _open_file)
    return hf.to_official(_open_file(p))


def input_files(path) -> list:
    """Every file opening `path` reads, as (what it is, path), without reading them.

    A file is just itself ("the file"); a Hugging Face folder lists its
    config.json, shard index and weight files (see hf.folder_files).
    """
    from . import hf

    p = Path(path)
    if p.is_dir():
        return hf.folder_files(p)
    return [("the file", p)]
