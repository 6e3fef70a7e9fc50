"""Reader of PyTorch checkpoints (.pth, pytorch_model.bin) without torch.

A torch.save file is a zip archive: `<prefix>/data.pkl` is a pickle of the
state dict whose tensors point, through pickle "persistent ids", at raw
storages `<prefix>/data/<key>`, stored uncompressed. We read the pickle with a
restricted unpickler and map each storage straight from the file.

Safety: a pickle can name any Python global and call it. Before unpickling,
every global the pickle names is checked against an allow-list (the tensor
rebuild function, float storage types, OrderedDict); any other global, or a
name the pickle assembles dynamically, refuses the file before a single
opcode runs. The unpickler's find_class enforces the same list again, and the
allowed names resolve to our own inert stand-ins: torch is never imported.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
import zlib

import numpy as np

from rwkvcpu.errors import ModelFormatError, UnsafePickleError

from .base import OFFICIAL, MappedSource, TensorInfo, as_float32, numel

ZIP_MAGIC = b"PK\x03\x04"
# Legacy (torch < 1.6) files start with a pickled magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _Storage:
    """Marker for a torch storage class; `dtype` is what its bytes hold."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


STORAGES = {
    "FloatStorage": _Storage("FloatStorage", "F32"),
    "HalfStorage": _Storage("HalfStorage", "F16"),
    "BFloat16Storage": _Storage("BFloat16Storage", "BF16"),
    "DoubleStorage": _Storage("DoubleStorage", "F64"),
}
# Harmless, but never RWKV weights: named in a clear refusal rather than as unsafe.
OTHER_STORAGES = {"LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                  "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                  "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128"}
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


class _StorageRef:
    def __init__(self, kind: _Storage, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class LazyTensor:
    """What _rebuild_tensor_v2 returns here: where a tensor's data lives."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.shape, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    return LazyTensor(storage, int(storage_offset), size, stride)


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
ALLOWED.update({("torch", n): s for n, s in STORAGES.items()})

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_REFUSED_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}
# Opcodes that leave the stack as it is (memo bookkeeping, framing).
_NO_STACK_EFFECT = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE", "FRAME", "PROTO"}


def scan_globals(data: bytes, path) -> list:
    """Every (module, name) the pickle would import, found without running it.

    Raises UnsafePickleError on a global outside ALLOWED, on a global whose
    name is computed at load time, and on opcodes that import by other routes.
    """
    found, stack, memo = [], [], {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else None)
                continue
            if name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo.get(int(arg)))
                continue
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                found.append((module, attr))
            elif name == "STACK_GLOBAL":
                module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                if not isinstance(module, str) or not isinstance(attr, str):
                    raise UnsafePickleError(
                        f"{path}: pickle builds a global's name at load time; refusing it (nothing was run)")
                found.append((module, attr))
            elif name in _REFUSED_OPS:
                raise UnsafePickleError(f"{path}: pickle uses opcode {name}, which a state dict never needs; "
                                        f"refusing it (nothing was run)")
            if name not in _NO_STACK_EFFECT:
                stack.append(None)
    except UnsafePickleError:
        raise
    except (ValueError, struct.error, IndexError) as e:
        raise ModelFormatError(f"{path}: corrupt pickle ({e})") from None
    for module, attr in found:
        if module == "torch" and attr in OTHER_STORAGES:
            raise ModelFormatError(
                f"{path}: holds {OTHER_STORAGES[attr]} tensors (torch.{attr}); RWKV checkpoints hold "
                f"bf16, fp16 or fp32 weights only")
        if (module, attr) not in ALLOWED:
            raise UnsafePickleError(
                f"{path}: pickle asks for {module}.{attr}, which a state dict never needs; "
                f"refusing to load it (nothing from the file was run)")
    return found


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, path):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: pickle asks for {module}.{name}, which a state dict never needs; "
                f"refusing to load it") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _Storage)):
            raise ModelFormatError(f"{self._path}: unexpected storage reference {pid!r:.80}")
        _, kind, key, _location, numel = pid
        return _StorageRef(kind, str(key), int(numel))


def load_pickle(data: bytes, path):
    """Unpickle a state-dict pickle safely (see module docstring)."""
    scan_globals(data, path)
    try:
        return _Unpickler(data, path).load()
    except (UnsafePickleError, ModelFormatError):
        raise
    except Exception as e:   # noqa: BLE001 - any failure of a corrupt pickle is a format error
        raise ModelFormatError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


def _flatten(obj, path):
    """The state dict as {name: LazyTensor}; refuses anything else."""
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    if "_strategy" in obj:
        raise ModelFormatError(
            f"{path}: converted by the rwkv package for strategy {obj['_strategy']!r}; "
            f"convert the original checkpoint instead")
    out = {}
    for k, v in obj.items():
        if isinstance(v, LazyTensor):
            out[str(k)] = v
        elif isinstance(v, dict) and k in ("state_dict", "model", "module"):
            out.update(_flatten(v, path))
        else:
            raise ModelFormatError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; expected a plain state dict")
    return out


class PthSource(MappedSource):
    """A torch zip checkpoint, read without torch.

    Example:
        >>> with PthSource("RWKV-x070-World-0.1B.pth") as src:
        ...     emb = src.load("emb.weight")      # float32 (65536, 768)
    """

    format = "pth"
    naming = OFFICIAL

    def _index(self):
        p, mm = self.path, self._file.mm
        head = bytes(mm[:16])
        if head.startswith(LEGACY_MAGIC[:3]) and not head.startswith(ZIP_MAGIC):
            raise ModelFormatError(
                f"{p}: legacy (torch < 1.6) checkpoint format; re-save it with a current torch.save")
        try:
            zf = zipfile.ZipFile(_MMapReader(mm))
            entries = {i.filename: i for i in zf.infolist()}
        except (zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError) as e:
            raise ModelFormatError(f"{p}: not a valid torch zip checkpoint, or truncated ({e})") from None
        pkls = [n for n in entries if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ModelFormatError(f"{p}: zip file without exactly one data.pkl; not a torch checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            data = zf.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise ModelFormatError(f"{p}: cannot read data.pkl ({e})") from None
        tensors = _flatten(load_pickle(data, p), p)
        self._lazy = {}
        for name, t in tensors.items():
            key = f"{prefix}data/{t.storage.key}"
            if key not in entries:
                raise ModelFormatError(f"{p}: tensor {name!r} points at missing storage {key}")
            info = entries[key]
            dt = t.storage.kind.dtype
            isz = _ITEMSIZE[dt]
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelFormatError(f"{p}: storage {key} is compressed; torch never writes that")
            start = self._data_start(info)
            if t.storage.numel * isz > info.file_size or start + info.file_size > self._file.size:
                raise ModelFormatError(f"{p}: truncated in tensor {name!r} (storage {key})")
            n = numel(t.shape)
            if n and (t.offset + sum((s - 1) * st for s, st in zip(t.shape, t.stride)) + 1 > t.storage.numel):
                raise ModelFormatError(f"{p}: tensor {name!r} reaches past the end of its storage")
            self._lazy[name] = (t, start, dt)
            self._offsets[name] = start + t.offset * isz
            self._infos[name] = TensorInfo(name, t.shape, dt, n * isz)

    def _data_start(self, info):
        mm = self._file.mm
        off = info.header_offset
        if off + 30 > self._file.size or bytes(mm[off:off + 4]) != ZIP_MAGIC:
            raise ModelFormatError(f"{self.path}: corrupt zip entry {info.filename}")
        name_len, extra_len = struct.unpack_from("<HH", mm, off + 26)
        return off + 30 + name_len + extra_len

    def load(self, name):
        self.info(name)
        t, start, dt = self._lazy[name]
        n = numel(t.shape)
        isz = _ITEMSIZE[dt]
        contiguous = contiguous_strides(t.shape) == t.stride or n <= 1
        if contiguous:
            raw = self._file.array(_NP[dt], start + t.offset * isz, n).reshape(t.shape)
        else:
            base = self._file.array(_NP[dt], start, t.storage.numel)
            raw = np.lib.stride_tricks.as_strided(
                base[t.offset:], shape=t.shape, strides=tuple(s * isz for s in t.stride), writeable=False)
        return as_float32(raw, dt)


def contiguous_strides(shape) -> tuple:
    """Strides (in items) of a C-contiguous array of this shape, as torch records them."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


class _MMapReader(io.RawIOBase):
    """A seekable read-only file object over an mmap, for zipfile's index."""

    def __init__(self, mm):
        self._mm, self._pos = mm, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        if whence == io.SEEK_SET:
            self._pos = pos
        elif whence == io.SEEK_CUR:
            self._pos += pos
        else:
            self._pos = len(self._mm) + pos
        if self._pos < 0:
            raise OSError("negative seek position")
        return self._pos

    def readinto(self, b):
        chunk = self._mm[self._pos:self._pos + len(b)]
        b[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)
