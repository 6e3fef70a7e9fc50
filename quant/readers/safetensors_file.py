"""Reader of one .safetensors file, by memory map.

Layout: u64 little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}),
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import struct

import numpy as np

from rwkvcpu.errors import ModelFormatError
from rwkvcpu.io import MAX_HEADER, header_length, parse_header

from .base import OFFICIAL, MappedSource, TensorInfo, as_float32, numel

# safetensors dtype -> numpy dtype of its stored items (BF16: the raw 16-bit words)
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NUMPY.items()}
_FLOAT = {k: _NUMPY[k] for k in ("F32", "F16", "BF16")}


def is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes (9 or more) look like safetensors: a plausible header
    length, then "{". The file's size is not asked: a file cut inside its header is still
    recognised, so that reading it says it is truncated."""
    if len(head) < 9:
        return False
    n = struct.unpack_from("<Q", head)[0]
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def read_header(mm, size, path) -> tuple:
    """(tensor entries, metadata dict, data start) of a safetensors file, checked by rwkvcpu.io.parse_header."""
    n = header_length(bytes(mm[:8]), size, path)
    header = parse_header(bytes(mm[8:8 + n]), size - 8 - n, path)
    meta = header.pop("__metadata__")
    return header, meta, 8 + n


class SafetensorsSource(MappedSource):
    """One safetensors file; float tensors load as float32.

    Example:
        >>> with SafetensorsSource("model.safetensors") as src:
        ...     names = list(src.tensors())
    """

    format = "safetensors"
    naming = OFFICIAL

    def _index(self):
        f, p = self._file, self.path
        header, self.metadata, start = read_header(f.mm, f.size, p)
        for name, e in header.items():
            a, b = e["data_offsets"]
            self._infos[name] = TensorInfo(name, tuple(e["shape"]), e["dtype"], b - a)
            self._offsets[name] = start + a
        # Tensors in file order, as the other readers give them.
        self._infos = dict(sorted(self._infos.items(), key=lambda kv: self._offsets[kv[0]]))

    def load(self, name):
        info = self.info(name)
        if info.dtype not in _FLOAT:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is {info.dtype}; expected a float tensor")
        raw = self._file.array(_FLOAT[info.dtype], self._offsets[name], numel(info.shape)).reshape(info.shape)
        return as_float32(raw, info.dtype)

    def load_raw(self, name) -> np.ndarray:
        """The stored array as is (any dtype), for `info` and tests."""
        info = self.info(name)
        return self._file.array(_NUMPY[info.dtype], self._offsets[name], numel(info.shape)).reshape(info.shape)
