"""Reading rwkvcpu model files: memory-mapped safetensors, checked against the layout.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets}, "__metadata__": {...}}), then the data.
We parse the header ourselves and hand out numpy views of one read-only mmap
of the file, so opening a model copies nothing into RAM: pages are read from
the page cache when a kernel first touches them, and shared between processes.

Example:
    >>> meta, arrays = open_safetensors("model-int8.safetensors")
    >>> config = ModelConfig.from_metadata(meta)
    >>> tensors = check_tensors(config, arrays, "model-int8.safetensors")
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Mapping

import numpy as np

from .config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from .errors import ModelFormatError
from .layouts import MATRIX, expected_tensors
from .formats import SUFFIXES, detect_stored_format

# safetensors dtype names we store, and the numpy types they map to.
DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
_DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

# A header larger than this is not a model file (safetensors itself caps it at 100 MB).
MAX_HEADER = 100 * 1024 * 1024

def header_length(head: bytes, size: int, path) -> int:
    """The JSON header's length N from a safetensors file's first 8 bytes, checked against the file.

    One rule for the engine (read_header) and the converter's reader
    (quant/readers/safetensors_file.py): N must be plausible (1 .. 100 MB),
    else the file is no safetensors file; a plausible N that runs past the end
    of the file means the file was cut inside its header.

    Args:
        head: the file's first bytes (at least 8 of them, or the whole file).
        size: the file's size in bytes.
        path: the file, for messages.

    Raises:
        ModelFormatError: too short, an implausible length, or truncated.

    Example:
        >>> header_length((100).to_bytes(8, "little") + b"{", 5000, "m.safetensors")
        100
    """
    if len(head) < 8:
        raise ModelFormatError(f"{path}: too short to be a safetensors file ({len(head)} bytes)")
    (n,) = struct.unpack_from("<Q", head)
    if n == 0 or n > MAX_HEADER:
        raise ModelFormatError(f"{path}: not a safetensors file (header length {n}, file size {size})")
    if 8 + n > size:
        raise ModelFormatError(
            f"{path}: truncated: the safetensors header says {8 + n} bytes of header but the file has {size}")
    return n


def read_header(path) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file, and where its data starts.

    Raises:
        ModelFormatError: the file is not a safetensors file, or is cut inside its header.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            n = header_length(f.read(8), os.fstat(f.fileno()).st_size, path)
            raw = f.read(n)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFormatError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def is_model_file(path) -> bool:
    """True when `path` is a safetensors file written by the rwkvcpu converter."""
    try:
        header, _ = read_header(path)
    except ModelFormatError:
        return False
    meta = header.get("__metadata__") or {}
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def open_safetensors(path) -> tuple[dict, dict]:
    """Memory-map a safetensors file.

    Args:
        path: the file.

    Returns:
        (metadata, arrays): the header's string metadata, and name -> read-only
        numpy view of the mapped file (fp16 as np.float16).

    Raises:
        ModelFormatError: a truncated or malformed file, or a dtype we do not store.

    Example:
        >>> meta, arrays = open_safetensors("model.safetensors")
        >>> arrays["emb.weight"].shape
        (65536, 768)
    """
    path = os.fspath(path)
    header, data_start = read_header(path)
    meta = header.pop("__metadata__", None) or {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        # A read-only private mapping: pages come from the page cache on first touch.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
    arrays = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype_name not in DTYPES:
            raise ModelFormatError(
                f"{path}: tensor {name!r} has dtype {dtype_name}; rwkvcpu files hold only "
                f"{', '.join(DTYPES)} (re-convert with `rwkvcpu convert`)")
        dtype = np.dtype(DTYPES[dtype_name])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or begin < 0 or data_start + end > size:
            raise ModelFormatError(
                f"{path}: tensor {name!r} ({dtype_name} {list(shape)}) needs {count * dtype.itemsize} bytes "
                f"at [{begin}, {end}) of a data section of {size - data_start} bytes; the file is truncated or corrupt")
        offset = data_start + begin
        a = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
        if offset % dtype.itemsize:
            # An unaligned tensor (not written by our converter): copy it rather than
            # hand kernels a misaligned view.
            a = a.copy()
            a.flags.writeable = False
        arrays[name] = a
    return dict(meta), arrays


def _dtype_name(a) -> str:
    return _DTYPE_NAMES.get(np.asarray(a).dtype, str(np.asarray(a).dtype))


def check_tensors(config: ModelConfig, arrays: Mapping[str, np.ndarray], source: str) -> dict:
    """Check tensors against the model's canonical layout and group matrix parts.

    Args:
        config: the model's configuration (from the file's metadata).
        arrays: name -> array, as stored (matrices as their parts "W", "W.scale", "W.min").
        source: the file name, for error messages.

    Returns:
        name -> array for vectors, low-rank matrices and state tensors; name ->
        (format, {suffix: array}) for matrices. Optional tensors that are absent
        are left out.

    Raises:
        ModelFormatError: a tensor is missing, misshapen, of the wrong dtype, or unexpected;
            the message names the tensor, the shapes and the file.
    """
    expected = expected_tensors(config)
    out, seen = {}, set()
    where = f"a {config.generation} model with L={config.n_layer} D={config.n_embd} V={config.vocab_size}"
    for name, (shape, kind, optional) in expected.items():
        if kind == MATRIX:
            parts = {sfx: arrays[name + sfx] for sfx in SUFFIXES if name + sfx in arrays}
            if "" not in parts:
                raise ModelFormatError(f"{source}: tensor {name!r} {list(shape)} is missing ({where})")
            try:
                fmt = detect_stored_format(parts)
            except ModelFormatError as e:
                raise ModelFormatError(f"{source}: tensor {name!r}: {e}") from None
            want = fmt.part_shapes(shape)
            for sfx, a in parts.items():
                if sfx not in want:
                    raise ModelFormatError(f"{source}: tensor {name + sfx!r} is not part of a {fmt.name} matrix")
                if tuple(a.shape) != want[sfx]:
                    raise ModelFormatError(
                        f"{source}: tensor {name + sfx!r} has shape {list(a.shape)}, expected {list(want[sfx])} "
                        f"for a {fmt.name} matrix of shape {list(shape)} ({where})")
                seen.add(name + sfx)
            out[name] = (fmt.name, parts)
            continue
        if name not in arrays:
            if optional:
                continue
            raise ModelFormatError(f"{source}: tensor {name!r} {list(shape)} is missing ({where})")
        a = arrays[name]
        if tuple(a.shape) != shape:
            raise ModelFormatError(
                f"{source}: tensor {name!r} has shape {list(a.shape)}, expected {list(shape)} ({where})")
        if _dtype_name(a) != "F32":
            raise ModelFormatError(f"{source}: tensor {name!r} is {_dtype_name(a)}, expected F32")
        seen.add(name)
        out[name] = a
    extra = sorted(set(arrays) - seen)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ModelFormatError(
            f"{source}: unexpected tensors for {where}: {', '.join(map(repr, extra[:3]))}{more}; "
            f"the file's metadata does not match its tensors (re-convert with `rwkvcpu convert`)")
    return out


def check_metadata(meta: Mapping[str, str], source: str) -> ModelConfig:
    """The configuration stored in an rwkvcpu file's metadata, after checking the format tag."""
    if meta.get("format") != FORMAT_NAME:
        raise ModelFormatError(
            f"{source}: not an rwkvcpu model file (no format={FORMAT_NAME} in its metadata); "
            f"convert the checkpoint with `rwkvcpu convert`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ModelFormatError(
            f"{source}: rwkvcpu format version {meta.get('format_version')!r}, this rwkvcpu reads "
            f"version {FORMAT_VERSION}; re-convert the checkpoint with this version")
    return ModelConfig.from_metadata(meta, source)
