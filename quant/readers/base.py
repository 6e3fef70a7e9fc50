"""What every checkpoint reader offers: a lazy, name-addressed set of tensors.

A reader parses only the file's index when it opens (names, shapes, storage
types, offsets); `load(name)` then reads one tensor as float32 in numpy
(row-major) order. The converter loads, transforms, writes and releases one
tensor at a time, so it never holds the whole model in memory.

Readers present tensors under their source's own names. Two namings exist:
"official" (BlinkDL's .pth keys; Hugging Face readers rename into it) and
"rwkv.cpp" (official keys, but some values and shapes transformed by
rwkv.cpp's converter). quant/canonical.py maps each naming to the canonical
layout.
"""

from __future__ import annotations

import math
import mmap
import numbers
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rwkvcpu.errors import ModelFormatError, open_input, shown

OFFICIAL, RWKV_CPP = "official", "rwkv.cpp"


class TensorInfo(NamedTuple):
    name: str        # source key
    shape: tuple     # numpy order
    dtype: str       # storage type in the source: "F32", "F16", "BF16", "Q5_1", ...
    nbytes: int      # bytes it occupies in the source


class Source:
    """Base class of the readers.

    Attributes:
        path: the file or folder given by the user.
        format: short name of the source format ("pth", "rwkv.cpp", ...).
        naming: OFFICIAL or RWKV_CPP (which canonical rule table applies).
        group_norm_eps: epsilon the source's own implementation uses in ln_x
            for the detected generation, or None to use the official value.
        files: the files whose bytes make up the checkpoint (hashed into the
            output's metadata).
        details: extra facts for `rwkvcpu info` (str -> str).
    """

    format = "?"
    naming = OFFICIAL

    def __init__(self, path):
        self.path = Path(path)
        self.files = [self.path]
        self.details = {}
        self._infos = {}

    def group_norm_eps(self, family: str):
        """Epsilon of ln_x that this source's implementation uses (None: official)."""
        return None

    def tokenizer_name(self):
        """The tokenizer the source names itself (a GGUF file's vocabulary), or None: chosen by vocabulary size.

        Raises:
            ConversionError: the source names a tokenizer rwkvcpu does not have.
        """
        return None

    def tensors(self) -> dict:
        """name -> TensorInfo, in file order."""
        return self._infos

    def stored(self) -> list:
        """TensorInfo of the tensors as the file stores them (for `info`); the same as
        tensors() except where a reader presents one stored tensor as several."""
        return list(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing") from None

    def load(self, name: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Tell the OS the pages of this tensor are no longer needed."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint_file(path: Path):
    """Open a checkpoint file for binary reading; a one-line ModelFormatError if it cannot be read.

    Raises:
        ModelFormatError: missing, a directory, not a regular file (a named pipe,
            a device, a socket), not readable, or empty.
    """
    f = open_input(path, "file", ModelFormatError)
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise ModelFormatError(f"{path}: file is empty")
    return f


class MappedFile:
    """A read-only memory map of one file, with page release after use.

    Pages of a read-only file mapping count in the process's resident set once
    touched; `drop` hands them back (the page cache keeps them), so peak memory
    stays near the few tensors in flight rather than the whole file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._f = open_checkpoint_file(self.path)
        self.size = os.fstat(self._f.fileno()).st_size
        self.mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)

    def array(self, dtype, offset: int, count: int) -> np.ndarray:
        """A read-only view of `count` items of `dtype` at byte `offset`.

        Raises:
            ModelFormatError: the items do not lie inside the file.
        """
        dtype = np.dtype(dtype)
        offset, count = int(offset), int(count)
        end = offset + count * dtype.itemsize
        if offset < 0 or count < 0 or end > self.size:
            raise ModelFormatError(
                f"{self.path}: truncated (needs bytes up to {end}, file has {self.size})")
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=offset)

    def strided(self, dtype, start: int, n_items: int, shape, strides, offset: int, name: str) -> np.ndarray:
        """A read-only strided view into a storage of `n_items` items of `dtype` at byte `start`,
        after check_view has found every element inside that storage.

        Args:
            start: byte offset of the storage in the file.
            n_items: the storage's length, in items.
            shape, strides, offset: the view, in items (as torch records them).
            name: the tensor, for messages.
        """
        dtype = np.dtype(dtype)
        check_view(self.path, name, shape, strides, offset, n_items)
        base = self.array(dtype, start, n_items)
        if numel(shape) == 0:
            return np.zeros(tuple(shape), dtype)
        return np.lib.stride_tricks.as_strided(
            base[offset:], shape=tuple(shape), strides=tuple(s * dtype.itemsize for s in strides), writeable=False)

    def drop(self, offset: int, length: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, start, min(length + offset - start, self.size - start))
        except (OSError, ValueError):
            # Only a memory optimisation; correctness does not depend on it.
            pass

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            # A caller still holds a view; the map closes when it is collected.
            pass
        self._f.close()


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: bf16 is the high half of an fp32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


class MappedSource(Source):
    """A reader of one memory-mapped file.

    Subclasses parse the file's index in `_index` (filling `_infos`, and
    `_offsets`: name -> byte offset of the tensor's data); the map is closed
    if that fails, so a refused file leaves nothing open.
    """

    def __init__(self, path):
        super().__init__(path)
        self._offsets = {}
        self._file = MappedFile(path)
        try:
            self._index()
        except BaseException:
            self._file.close()
            raise

    def _index(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self, name):
        self._file.drop(self._offsets[name], self._infos[name].nbytes)

    def close(self):
        self._file.close()


def numel(shape) -> int:
    """Number of elements of a shape (1 for a scalar's ()), in Python integers: no product of
    a file's dimensions can wrap around."""
    return math.prod(int(d) for d in shape)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_view(path, name: str, shape, strides, offset, n_items: int) -> None:
    """Refuse a strided view that would reach outside its storage, before any view is made.

    Every reader that takes a (shape, strides, offset) from a file checks it here
    first: a negative stride or offset, or a product past the storage, would
    otherwise let numpy read memory outside the file's mapping.

    Args:
        path, name: the file and the tensor, for messages.
        shape, strides: the view, in items; strides must be non-negative (no
            format we read stores others).
        offset: the view's first item in the storage.
        n_items: the storage's length in items.

    Raises:
        ModelFormatError: a value that is not an integer, a negative dimension,
            stride or offset, more elements than the storage has, or an element
            past the storage's end.

    Example:
        >>> check_view("m.pth", "emb.weight", (4, 64), (-64, 1), 192, 256)
        ModelFormatError: m.pth: tensor 'emb.weight' has a negative stride (-64, 1); ...
    """
    shape, strides = tuple(shape), tuple(strides)
    if not all(_is_int(v) for v in shape + strides + (offset, n_items)):
        raise ModelFormatError(f"{path}: tensor {name!r} has a shape, strides or offset that are not integers "
                               f"({shown(shape)}, {shown(strides)}, {shown(offset)})")
    if len(shape) != len(strides):
        raise ModelFormatError(f"{path}: tensor {name!r} has {len(shape)} dimensions but {len(strides)} strides")
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: tensor {name!r} has a negative dimension in its shape {shown(shape)}")
    if any(s < 0 for s in strides) or offset < 0:
        raise ModelFormatError(f"{path}: tensor {name!r} has a negative stride or offset (strides {shown(strides)}, "
                               f"offset {offset}); the file is corrupt or crafted")
    if numel(shape) > n_items or any(d > n_items for d in shape):
        # More elements than the storage holds: items repeat (a zero stride), and
        # loading it would allocate more than the file could ever back.
        raise ModelFormatError(f"{path}: tensor {name!r} of shape {shown(shape)} holds more elements than its "
                               f"storage ({n_items})")
    if numel(shape) == 0:
        return
    last = offset + sum((d - 1) * s for d, s in zip(shape, strides))
    if last >= n_items:
        raise ModelFormatError(
            f"{path}: tensor {name!r} reaches past the end of its storage (item {last} of {n_items})")


def as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored float array (dtype "F32", "F16", "BF16" as uint16 bits, "F64") as float32.

    F32 is returned as it is (a view of the file); the others are converted.
    """
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype == "F32":
        return raw
    return raw.astype(np.float32)
