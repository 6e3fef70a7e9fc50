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

The same scan bounds the work: a pickle of more than MAX_PICKLE_BYTES or
MAX_PICKLE_OPS (a state dict of 100,000 tensors needs a tenth of either), or
whose memo indices jump ahead (Python's unpickler would allocate a table that
large), is refused before it runs; the state dict it builds may nest dicts a
few levels deep, never share or repeat one. Every tensor's view (shape,
strides, offset) is checked against its storage before it is mapped.
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

from rwkvcpu.errors import ModelFormatError, UnsafePickleError, shown

from .base import OFFICIAL, MappedSource, TensorInfo, as_float32, check_view, numel

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


# Bounds on the state-dict pickle (data.pkl): a torch state dict takes about 30
# opcodes and 200 bytes per tensor, so these allow some 100,000 tensors while
# keeping the scan under a second and the unpickled objects a few hundred MB.
MAX_PICKLE_BYTES = 32 * 1024 * 1024
MAX_PICKLE_OPS = 2_000_000
# A state dict is a dict of tensors, at most nested under "state_dict"/"model"/"module".
MAX_NESTING = 4


class _StorageRef:
    def __init__(self, kind: _Storage, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class LazyTensor:
    """What _rebuild_tensor_v2 returns here: where a tensor's data lives."""

    def __init__(self, storage, offset, size, stride):
        # Kept as the pickle gave them: checked (check_view) before anything is mapped.
        self.storage, self.offset = storage, offset
        self.shape, self.stride = tuple(size), tuple(stride)


class _Refused(Exception):
    """Raised while unpickling by our stand-ins; load_pickle adds the file's name."""

    def __init__(self, message, error=ModelFormatError):
        super().__init__(message)
        self.error = error


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise _Refused("tensor rebuilt from something that is not a storage", UnsafePickleError)
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise _Refused(f"tensor rebuilt with size {shown(size)} and stride {shown(stride)}, not sequences")
    return LazyTensor(storage, storage_offset, size, stride)


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
    name is computed at load time, and on opcodes that import by other routes;
    ModelFormatError on a pickle too long for a state dict (MAX_PICKLE_BYTES,
    MAX_PICKLE_OPS) or whose memo indices jump ahead of the objects it made.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise ModelFormatError(f"{path}: its pickle (data.pkl) is {len(data):,} bytes; a state dict's is at most "
                               f"{MAX_PICKLE_BYTES:,}, so this is not a checkpoint rwkvcpu reads")
    found, stack, memo = [], [], {}
    try:
        for n_ops, (op, arg, _pos) in enumerate(pickletools.genops(data)):
            name = op.name
            if n_ops >= MAX_PICKLE_OPS:
                raise ModelFormatError(f"{path}: its pickle runs more than {MAX_PICKLE_OPS:,} opcodes; a state dict "
                                       f"needs far fewer, so this is not a checkpoint rwkvcpu reads")
            if name in ("BINPUT", "LONG_BINPUT", "PUT") and not 0 <= int(arg) <= len(memo):
                # The unpickler sizes its memo table by the largest index: one such
                # opcode in a tiny file would allocate gigabytes.
                raise ModelFormatError(f"{path}: corrupt pickle (memo index {int(arg)} after {len(memo)} entries)")
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
    except (UnsafePickleError, ModelFormatError):
        raise
    except (ValueError, struct.error, IndexError, OverflowError) as e:
        raise ModelFormatError(f"{path}: corrupt pickle ({shown(str(e))})") from None
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
                or not isinstance(pid[1], _Storage) or not isinstance(pid[2], (str, int))
                or isinstance(pid[4], bool) or not isinstance(pid[4], int) or pid[4] < 0):
            raise ModelFormatError(f"{self._path}: unexpected storage reference {shown(pid)}")
        _, kind, key, _location, numel = pid
        return _StorageRef(kind, str(key), numel)


def load_pickle(data: bytes, path):
    """Unpickle a state-dict pickle safely (see module docstring)."""
    scan_globals(data, path)
    try:
        return _Unpickler(data, path).load()
    except (UnsafePickleError, ModelFormatError):
        raise
    except _Refused as e:
        raise e.error(f"{path}: {e}") from None
    except Exception as e:   # noqa: BLE001 - any failure of a corrupt pickle is a format error
        raise ModelFormatError(f"{path}: corrupt pickle ({type(e).__name__}: {shown(str(e))})") from None


def _flatten(obj, path):
    """The state dict as {name: LazyTensor}; refuses anything else.

    Tensors may sit at most MAX_NESTING dicts deep (under "state_dict", "model"
    or "module"); a dict or tensor reached twice (a shared or cyclic reference,
    which a pickle expresses in a few bytes and which would make the walk
    exponential) refuses the file.
    """
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    if "_strategy" in obj:
        raise ModelFormatError(
            f"{path}: converted by the rwkv package for strategy {shown(obj['_strategy'])}; "
            f"convert the original checkpoint instead")
    out, seen = {}, set()
    _collect(obj, 0, out, seen, path)
    return out


def _collect(d: dict, depth: int, out: dict, seen: set, path) -> None:
    if id(d) in seen:
        raise ModelFormatError(f"{path}: the pickle reaches one dict twice (a shared or cyclic reference); "
                               f"expected a plain state dict")
    seen.add(id(d))
    for k, v in d.items():
        if not isinstance(k, str):
            raise ModelFormatError(f"{path}: key {shown(k)} is a {type(k).__name__}, not a tensor name")
        if isinstance(v, LazyTensor):
            if k in out:
                raise ModelFormatError(f"{path}: tensor {shown(k)} appears twice in the state dict")
            out[k] = v
        elif isinstance(v, dict) and k in ("state_dict", "model", "module"):
            if depth + 1 > MAX_NESTING:
                raise ModelFormatError(f"{path}: the state dict is nested more than {MAX_NESTING} levels deep")
            _collect(v, depth + 1, out, seen, path)
        else:
            raise ModelFormatError(
                f"{path}: entry {shown(k)} is a {type(v).__name__}, not a tensor; expected a plain state dict")


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
        except (zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError, NotImplementedError) as e:
            raise ModelFormatError(f"{p}: not a valid torch zip checkpoint, or truncated ({shown(str(e))})") from None
        pkls = [n for n in entries if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ModelFormatError(f"{p}: zip file without exactly one data.pkl; not a torch checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        data = self._read_pickle(zf, entries[pkls[0]])
        tensors = _flatten(load_pickle(data, p), p)
        self._lazy = {}
        for name, t in tensors.items():
            key = f"{prefix}data/{t.storage.key}"
            if key not in entries:
                raise ModelFormatError(f"{p}: tensor {name!r} points at missing storage {shown(key)}")
            info = entries[key]
            dt = t.storage.kind.dtype
            isz = _ITEMSIZE[dt]
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelFormatError(f"{p}: storage {shown(key)} is compressed; torch never writes that")
            start = self._data_start(info)
            if t.storage.numel * isz > info.file_size or start + info.file_size > self._file.size:
                raise ModelFormatError(f"{p}: truncated in tensor {name!r} (storage {shown(key)})")
            check_view(p, name, t.shape, t.stride, t.offset, t.storage.numel)
            n = numel(t.shape)
            self._lazy[name] = (t, start, dt)
            self._offsets[name] = start + t.offset * isz
            self._infos[name] = TensorInfo(name, t.shape, dt, n * isz)

    def _read_pickle(self, zf, info) -> bytes:
        """data.pkl's bytes, read no further than MAX_PICKLE_BYTES whatever its entry claims
        (a compressed entry could expand a few KB into gigabytes)."""
        p = self.path
        if info.file_size > MAX_PICKLE_BYTES:
            raise ModelFormatError(f"{p}: its pickle (data.pkl) is {info.file_size:,} bytes; a state dict's is at "
                                   f"most {MAX_PICKLE_BYTES:,}, so this is not a checkpoint rwkvcpu reads")
        try:
            with zf.open(info) as f:
                data = f.read(MAX_PICKLE_BYTES + 1)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as e:
            raise ModelFormatError(f"{p}: cannot read data.pkl ({shown(str(e))})") from None
        if len(data) > MAX_PICKLE_BYTES:
            raise ModelFormatError(f"{p}: its pickle (data.pkl) expands past {MAX_PICKLE_BYTES:,} bytes; "
                                   f"not a checkpoint rwkvcpu reads")
        return data

    def _data_start(self, info):
        mm = self._file.mm
        off = info.header_offset
        if off < 0 or off + 30 > self._file.size or bytes(mm[off:off + 4]) != ZIP_MAGIC:
            raise ModelFormatError(f"{self.path}: corrupt zip entry {info.filename}")
        name_len, extra_len = struct.unpack_from("<HH", mm, off + 26)
        return off + 30 + name_len + extra_len

    def load(self, name):
        self.info(name)
        t, start, dt = self._lazy[name]
        n = numel(t.shape)
        isz = _ITEMSIZE[dt]
        if contiguous_strides(t.shape) == t.stride or n <= 1:
            raw = self._file.array(_NP[dt], start + t.offset * isz, n).reshape(t.shape)
        else:
            raw = self._file.strided(_NP[dt], start, t.storage.numel, t.shape, t.stride, t.offset, name)
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
