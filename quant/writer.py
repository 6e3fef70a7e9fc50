"""Streaming safetensors writer: header first, then each tensor as it is made.

The header (names, dtypes, shapes, offsets) is computed up front from the
plan, so tensors can be written one at a time, each at its precomputed offset,
and never all held in memory. Tensors are ordered by item size (4-byte, then
2-byte, then 1-byte) and the data section starts at a multiple of 64 bytes, so
every tensor's offset is a multiple of its item size: the engine memory-maps
the file and takes numpy views without copying. (safetensors forbids gaps
between tensors, so ordering, not padding, provides the alignment.)

The file is written under a temporary name beside the destination and renamed
into place only when complete; on any error or Ctrl-C the temporary file is
removed and the destination is untouched. Space for the whole file is
reserved before the first tensor, so a full disk fails fast. Only a regular
file (or nothing) is ever replaced: a directory, device, named pipe or socket
at the destination, also behind a symbolic link, is refused before anything
is written (check_destination). A symbolic link to a regular file is replaced
by the new file, as `mv` would; the file it pointed to is left untouched.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rwkvcpu.errors import ConversionError, file_kind

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
NUMPY = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
DATA_ALIGN = 64
_CHUNK = 64 * 1024 * 1024
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)


class Entry(NamedTuple):
    name: str
    dtype: str       # safetensors dtype
    shape: tuple
    offset: int      # from the start of the data section
    nbytes: int


def layout(specs) -> list:
    """Offsets for (name, dtype, shape) specs: grouped by item size, largest first.

    Args:
        specs: iterable of (name, safetensors dtype, shape).

    Returns:
        list of Entry in file order.

    Example:
        >>> [e.name for e in layout([("q", "I8", (2, 64)), ("v", "F32", (3,))])]
        ['v', 'q']
    """
    specs = list(specs)
    order = sorted(range(len(specs)), key=lambda i: -ITEMSIZE[specs[i][1]])
    out, offset = [], 0
    for i in order:
        name, dtype, shape = specs[i]
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype] if shape else ITEMSIZE[dtype]
        out.append(Entry(name, dtype, tuple(int(d) for d in shape), offset, nbytes))
        offset += nbytes
    return out


def header_bytes(entries, metadata: dict) -> bytes:
    """The safetensors header (length prefix included), padded so data starts aligned."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                          "data_offsets": [e.offset, e.offset + e.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    pad = (-(8 + len(raw))) % DATA_ALIGN
    raw += b" " * pad
    return len(raw).to_bytes(8, "little") + raw


def check_destination(dst) -> Path:
    """Refuse an output path that cannot take a new regular file.

    Args:
        dst: the output path.

    Returns:
        dst as a Path.

    Raises:
        ConversionError: dst exists and is not a regular file (after following
            symbolic links), or its directory is missing or not writable.

    Example:
        >>> check_destination("out.safetensors")
        PosixPath('out.safetensors')
    """
    dst = Path(dst)
    try:
        mode = os.stat(dst).st_mode
    except FileNotFoundError:
        # Nothing there (or a dangling symbolic link, which is replaced like any link).
        mode = None
    except OSError as e:
        raise ConversionError(f"{dst}: cannot inspect the output path ({e.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = file_kind(mode)
        if stat.S_ISDIR(mode) and not dst.is_symlink():
            raise ConversionError(f"{dst}: is a directory; give the output file's name")
        via = f"a symbolic link to {kind} ({os.path.realpath(dst)})" if dst.is_symlink() else kind
        raise ConversionError(f"{dst}: is {via}, not a regular file; refusing to replace it, "
                              f"give the output file's name")
    parent = dst.parent
    if not parent.exists():
        raise ConversionError(f"{dst}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ConversionError(f"{dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"{dst}: directory {parent} is not writable")
    return dst


def _no_space(dst, total):
    return ConversionError(
        f"{dst}: no space left on the device ({total / 1e6:.1f} MB needed); nothing was written")


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, atomically.

    Example:
        >>> with SafetensorsWriter("out.safetensors", {"format": "rwkvcpu"},
        ...                        [("w", "F32", (2, 2))]) as w:
        ...     w.write("w", np.eye(2, dtype=np.float32))
        ...     w.commit()
    """

    def __init__(self, dst, metadata: dict, specs):
        self.dst = check_destination(dst)
        self.entries = {e.name: e for e in layout(specs)}
        self._header = header_bytes(self.entries.values(), metadata)
        self._data_start = len(self._header)
        self.total = self._data_start + sum(e.nbytes for e in self.entries.values())
        self._written = set()
        self._fd = None
        self._tmp = self.dst.parent / f".{self.dst.name}.{os.getpid()}.partial"

    def __enter__(self):
        # One try around the open too: an interrupt arriving just after the
        # file is created must still remove it.
        try:
            try:
                self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, as any new file
            except OSError as e:
                raise ConversionError(f"{self.dst}: cannot create the output ({e.strerror})") from None
            self._reserve()
            self._pwrite(self._header, 0)
        except BaseException:
            self._discard()
            raise
        return self

    def _reserve(self):
        try:
            os.posix_fallocate(self._fd, 0, self.total)
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise _no_space(self.dst, self.total) from None
            # Filesystems without fallocate: space is then claimed by the writes.
        except AttributeError:
            pass

    def _pwrite(self, data, offset):
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(mv):
                n = os.pwrite(self._fd, mv[done:done + _CHUNK], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError as e:
            raise self._write_failed(e) from None

    def _write_failed(self, e: OSError) -> ConversionError:
        if e.errno in _NO_SPACE:
            return _no_space(self.dst, self.total)
        return ConversionError(f"{self.dst}: write failed ({e.strerror})")

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor; its dtype and shape must match the header."""
        e = self.entries.get(name)
        if e is None or name in self._written:
            raise ConversionError(f"{self.dst}: internal error: unexpected tensor {name}")
        a = np.asarray(array)
        if a.dtype != np.dtype(NUMPY[e.dtype]) or a.shape != e.shape:
            raise ConversionError(
                f"{self.dst}: internal error: {name} is {a.dtype} {a.shape}, planned {e.dtype} {e.shape}")
        if sys.byteorder != "little":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a)
        self._pwrite(a.reshape(-1).view(np.uint8), self._data_start + e.offset)
        self._written.add(name)

    def commit(self) -> Path:
        """Check every tensor was written, then move the file into place."""
        missing = [n for n in self.entries if n not in self._written]
        if missing:
            raise ConversionError(f"{self.dst}: internal error: {len(missing)} tensors not written ({missing[0]})")
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise self._write_failed(e) from None
        os.close(self._fd)
        self._fd = None
        try:
            os.replace(self._tmp, self.dst)
        except OSError as e:
            raise ConversionError(f"{self.dst}: cannot move the finished file into place ({e.strerror})") from None
        return self.dst

    def _discard(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            os.unlink(self._tmp)
        except OSError:
            # Not created (or already gone): nothing to remove.
            pass

    def __exit__(self, exc_type, exc, tb):
        # Not committed (error, Ctrl-C, or a caller that forgot): leave nothing.
        if self._fd is not None or exc_type is not None:
            self._discard()
        return False
