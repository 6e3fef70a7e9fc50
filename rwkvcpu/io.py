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
import math
import mmap
import os
import struct
from typing import Mapping

import numpy as np

from .config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from .errors import ModelFormatError, open_input, shown
from .layouts import MATRIX, expected_tensors
from .formats import STORED_DTYPES as DTYPES, SUFFIXES, detect_stored_format

# numpy types -> the safetensors dtype names we store them as.
_DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

# A header larger than this is not a model file (safetensors itself caps it at 100 MB).
MAX_HEADER = 100 * 1024 * 1024

# Bytes per item of every safetensors dtype (the format's own list).
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                        "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# numpy takes at most this many dimensions (32 before numpy 2); no tensor of ours has more than 4.
MAX_NDIM = 32


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


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ModelFormatError(f"key {shown(dup)} appears twice")
    return dict(pairs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, data_size: int, path) -> dict:
    """A safetensors JSON header, with every type and range checked: the one place that does it.

    The engine (open_safetensors), the converter's reader and the benchmark all
    parse headers here, so a malformed header gets the same one-line answer
    everywhere and no caller sees an unchecked value.

    Checked: the JSON is an object without duplicate keys; "__metadata__" is
    absent, null or an object of strings; every other entry is an object with a
    known "dtype" string, a "shape" list of at most MAX_NDIM non-negative
    integers and "data_offsets" [begin, end] of integers with
    0 <= begin <= end <= data_size and end - begin = elements x item size
    (Python integers: no product wraps around); no two tensors' bytes overlap.

    Args:
        raw: the N header bytes after the length prefix.
        data_size: bytes after the header (the data section).
        path: the file, for messages.

    Returns:
        the header as a dict: name -> {"dtype", "shape", "data_offsets"}, and
        "__metadata__" -> dict of str (empty when absent).

    Raises:
        ModelFormatError: naming the file, the tensor and what is wrong.

    Example:
        >>> parse_header(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "m.safetensors")
        {'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}, '__metadata__': {}}
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: corrupt safetensors header ({e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        # ValueError: bad JSON, or an integer of thousands of digits; RecursionError: nesting.
        raise ModelFormatError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelFormatError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings, "
                               f"got {shown(meta)})")
    spans = []
    for name, e in header.items():
        where = f"{path}: tensor {shown(name)}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise ModelFormatError(f"{where} has a malformed header entry {shown(e)} "
                                   f"(needs dtype, shape and data_offsets)")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise ModelFormatError(f"{where} has an unknown dtype {shown(dtype)}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise ModelFormatError(f"{where} has a bad shape {shown(shape)} (a list of at most {MAX_NDIM} "
                                   f"non-negative integers)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise ModelFormatError(f"{where} has bad data_offsets {shown(offsets)} (two integers)")
        begin, end = offsets
        nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise ModelFormatError(f"{where} ({dtype} {shown(shape)}) needs {nbytes:,} bytes but its data_offsets "
                                   f"are {shown(offsets)}; the file is corrupt")
        if end > data_size:
            raise ModelFormatError(f"{where} ({dtype} {shown(shape)}) needs bytes [{begin:,}, {end:,}) of a data "
                                   f"section of {data_size:,} bytes; the file is truncated or corrupt")
        if begin < end:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise ModelFormatError(f"{path}: tensors {shown(a)} and {shown(b)} share bytes of the file "
                                   f"(data_offsets overlap); the file is corrupt or crafted")
    header["__metadata__"] = meta
    return header


def read_header(path) -> tuple[dict, int]:
    """The parsed, checked JSON header of a safetensors file (see parse_header), and where its data starts.

    Raises:
        ModelFormatError: the file is not a regular file or not a safetensors file, is cut
            inside its header, or its header is malformed.
    """
    path = os.fspath(path)
    with open_input(path, "file", ModelFormatError) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            n = header_length(f.read(8), size, path)
            raw = f.read(n)
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_header(raw, size - 8 - n, path), 8 + n


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
    with open_input(path, "file", ModelFormatError) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            n = header_length(f.read(8), size, path)
            header = parse_header(f.read(n), size - 8 - n, path)
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot read ({e.strerror or e})") from None
        # A read-only private mapping of the file checked above: pages come from the page cache on first touch.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data_start = 8 + n
    meta = header.pop("__metadata__")
    arrays = {}
    for name, info in header.items():
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype_name not in DTYPES:
            raise ModelFormatError(
                f"{path}: tensor {name!r} has dtype {dtype_name}; rwkvcpu files hold only "
                f"{', '.join(DTYPES)} (re-convert with `rwkvcpu convert`)")
        dtype = np.dtype(DTYPES[dtype_name])
        offset = data_start + begin
        a = np.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset).reshape(shape)
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
    if config.n_layer > len(arrays):
        # Checked before the layout is built: a metadata n_layer of 10^9 must not make a list of 10^9 layers.
        raise ModelFormatError(
            f"{source}: its metadata says {config.n_layer:,} layers but it holds only {len(arrays)} tensors; "
            f"the file is corrupt (re-convert with `rwkvcpu convert`)")
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
            if shape[-1] % fmt.group:
                # The kernels step through whole groups: a partial one would be read past its end.
                raise ModelFormatError(f"{source}: tensor {name!r} {list(shape)} is stored as {fmt.name}, whose "
                                       f"groups of {fmt.group} do not divide its width; the file is corrupt")
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
