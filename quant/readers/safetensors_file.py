"""Reader of one .safetensors file, by memory map.

Layout: u64 little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}),
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from rwkvcpu.errors import ModelFormatError

from .base import OFFICIAL, MappedFile, Source, TensorInfo, bf16_to_f32

_FLOAT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


def is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = struct.unpack_from("<Q", head)[0]
    return 2 <= n <= min(size - 8, MAX_HEADER) and head[8:9] == b"{"


def read_header(mm, size, path) -> tuple:
    """(tensor entries, metadata dict, data start) of a safetensors file."""
    if size < 8:
        raise ModelFormatError(f"{path}: truncated safetensors header")
    n = struct.unpack_from("<Q", mm, 0)[0]
    if n > min(size - 8, MAX_HEADER):
        raise ModelFormatError(f"{path}: truncated or corrupt safetensors header (claims {n} bytes)")
    try:
        header = json.loads(bytes(mm[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


class SafetensorsSource(Source):
    """One safetensors file; float tensors load as float32.

    Example:
        >>> with SafetensorsSource("model.safetensors") as src:
        ...     names = list(src.tensors())
    """

    format = "safetensors"
    naming = OFFICIAL

    def __init__(self, path):
        super().__init__(path)
        self._file = MappedFile(path)
        try:
            self._index()
        except BaseException:
            self._file.close()
            raise

    def _index(self):
        f, p = self._file, self.path
        header, self.metadata, start = read_header(f.mm, f.size, p)
        self._where = {}
        for name, e in header.items():
            try:
                dt, shape, (a, b) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelFormatError(f"{p}: corrupt safetensors entry for {name!r}") from None
            if dt not in _ITEMSIZE:
                raise ModelFormatError(f"{p}: tensor {name!r} has unknown dtype {dt}")
            n = int(np.prod(shape)) if shape else 1
            if b - a != n * _ITEMSIZE[dt] or a < 0:
                raise ModelFormatError(f"{p}: tensor {name!r} {shape} {dt} has inconsistent offsets")
            if start + b > f.size:
                raise ModelFormatError(f"{p}: truncated in tensor {name!r}")
            self._infos[name] = TensorInfo(name, shape, dt, b - a)
            self._where[name] = start + a
        # Tensors in file order, as the other readers give them.
        self._infos = dict(sorted(self._infos.items(), key=lambda kv: self._where[kv[0]]))

    def load(self, name):
        info = self.info(name)
        if info.dtype not in _FLOAT:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is {info.dtype}; expected a float tensor")
        n = int(np.prod(info.shape)) if info.shape else 1
        raw = self._file.array(_FLOAT[info.dtype], self._where[name], n).reshape(info.shape)
        if info.dtype == "BF16":
            return bf16_to_f32(raw)
        if info.dtype == "F16":
            return raw.astype(np.float32)
        return raw

    def load_raw(self, name) -> np.ndarray:
        """The stored array as is (any dtype), for `info` and tests."""
        info = self.info(name)
        np_dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I8": np.int8, "U8": np.uint8,
                 "F64": np.float64, "I32": np.int32, "I64": np.int64, "I16": np.int16, "U16": np.uint16,
                 "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}[info.dtype]
        n = int(np.prod(info.shape)) if info.shape else 1
        return self._file.array(np_dt, self._where[name], n).reshape(info.shape)

    def release(self, name):
        self._file.drop(self._where[name], self._infos[name].nbytes)

    def close(self):
        self._file.close()
