"""The recurrent state: one contiguous float32 array with named views.

Layout (``state_layout(config)``), sections in this order, each a C-contiguous
block of the flat array with the layer as its leading axis:

    v4:        att_x (L, D)  att_aa (L, D)  att_bb (L, D)  att_pp (L, D)  ffn_x (L, D)
    v5/v6/v7:  att_x (L, D)  wkv (L, H, S, S)  ffn_x (L, D)

att_x / ffn_x: the previous token's normalised input to the time mix and the
channel mix (token shift). att_aa, att_bb, att_pp: v4's numerator, denominator
and running exponent (the max-trick that keeps exp from overflowing). wkv: the
per-head matrix state; v5/v6 index it [head, key, value], v7 [head, value, key],
as in the official implementations, so state-tuned `time_state` tensors load
unchanged.

The sections of each family, with their initial values, are one table,
STATE_SECTIONS; state_layout and State.zeros read it.

The size depends only on the configuration: the same after 10 tokens or 10
million.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from typing import NamedTuple

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError, StateFileError, StateMismatchError, open_input, os_reason

# Initial value of v4's running exponent: "minus infinity" that stays finite in
# fp32 arithmetic (exp(-1e38 - p) underflows cleanly to 0).
V4_PP_INIT = -1e38



def _save_error(path: str, e: OSError) -> StateFileError:
    folder = os.path.dirname(path) or "."
    if e.errno == errno.ENOENT:
        reason = f"no such directory {folder}"
    elif e.errno == errno.ENOTDIR:
        reason = f"{folder} is not a directory"
    else:
        reason = os_reason(e)
    return StateFileError(f"{path}: cannot save the state: {reason}")


class Section(NamedTuple):
    offset: int      # in float32 elements
    shape: tuple


class SectionSpec(NamedTuple):
    """One section of a family's state, before the configuration gives it sizes."""
    name: str
    shape: tuple         # symbolic, as in rwkvcpu.layouts: L layers, D width, H heads, S head size
    initial: float = 0.0


_ATT_X = SectionSpec("att_x", ("L", "D"))
_FFN_X = SectionSpec("ffn_x", ("L", "D"))
_WKV = SectionSpec("wkv", ("L", "H", "S", "S"))

# family -> sections of its state, in memory order.
STATE_SECTIONS = {
    "v4": (_ATT_X, SectionSpec("att_aa", ("L", "D")), SectionSpec("att_bb", ("L", "D")),
           SectionSpec("att_pp", ("L", "D"), V4_PP_INIT), _FFN_X),
    "v5": (_ATT_X, _WKV, _FFN_X),
    "v6": (_ATT_X, _WKV, _FFN_X),
    "v7": (_ATT_X, _WKV, _FFN_X),
}


def state_layout(config: ModelConfig) -> dict:
    """Named sections of the flat state array.

    Args:
        config: the model's configuration.

    Returns:
        dict name -> Section(offset, shape), in memory order.

    Example:
        >>> cfg = ModelConfig("v7", n_layer=2, n_embd=64, vocab_size=256, dim_ffn=256, head_size=16)
        >>> state_layout(cfg)["wkv"]
        Section(offset=128, shape=(2, 4, 16, 16))
    """
    dims = config.dims()
    dims["L"] = config.n_layer
    layout, offset = {}, 0
    for spec in STATE_SECTIONS[config.family]:
        shape = tuple(dims[d] for d in spec.shape)
        layout[spec.name] = Section(offset, shape)
        offset += int(np.prod(shape))
    return layout


def state_size(config: ModelConfig) -> int:
    """Number of float32 elements in a state."""
    return sum(int(np.prod(s.shape)) for s in state_layout(config).values())


class State:
    """The recurrent state of one sequence.

    Attributes:
        data: the flat float32 array holding everything.
        views: dict section name -> view into data (see state_layout), also
            reachable as attributes: ``state.wkv``, ``state.att_x``, ...
        fingerprint: identifies the model this state belongs to.

    Example:
        >>> logits, state = model.forward([1, 2, 3])
        >>> saved = state.copy()
        >>> state.save("chat.state")
        >>> state = State.load("chat.state", model)
    """

    __slots__ = ("config", "data", "views", "fingerprint")

    def __init__(self, config: ModelConfig, data: np.ndarray, fingerprint: str):
        layout = state_layout(config)
        size = state_size(config)
        if data.dtype != np.float32 or data.ndim != 1 or data.size != size or not data.flags.c_contiguous:
            raise StateMismatchError(
                f"state array must be a contiguous float32 vector of {size} elements for this model, "
                f"got {data.dtype} {data.shape}; start from model.initial_state() instead"
            )
        self.config = config
        self.data = data
        self.fingerprint = fingerprint
        self.views = {name: data[s.offset:s.offset + int(np.prod(s.shape))].reshape(s.shape)
                      for name, s in layout.items()}

    def __getattr__(self, name):
        try:
            return self.views[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def zeros(cls, config: ModelConfig, fingerprint: str) -> "State":
        """A fresh state: every section at its initial value (zeros, but v4's
        running exponent at "minus infinity")."""
        state = cls(config, np.empty(state_size(config), np.float32), fingerprint)
        for spec in STATE_SECTIONS[config.family]:
            state.views[spec.name][:] = spec.initial
        return state

    def copy(self) -> "State":
        """An independent copy (the engine never changes a state passed to it)."""
        return State(self.config, self.data.copy(), self.fingerprint)

    def __len__(self):
        return self.data.size

    def __repr__(self):
        return f"State({self.config.generation}, {self.data.size} floats, model {self.fingerprint[:12]})"

    def save(self, path, *, extra=None) -> None:
        """Write the state to a safetensors file tagged with its model's fingerprint.

        The file is written under a hidden temporary name next to `path`, then
        renamed, so `path` is either the old file or the whole new one; it gets
        the permissions of any new file (0666 less the umask).

        Args:
            path: destination file.
            extra: optional name -> numpy array, stored beside the state (the server's
                state cache keeps the prompt's tokens there); `load` ignores them.

        Raises:
            StateFileError: the file cannot be written (no such directory, a
                directory, permission denied, disk full); nothing is left behind.
        """
        from safetensors.numpy import save as to_bytes
        path = os.fspath(path)
        folder, name = os.path.split(path)
        if os.path.isdir(path):
            raise _save_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
        meta = {"format": "rwkvcpu-state", "fingerprint": self.fingerprint,
                "config": json.dumps(self.config.to_metadata(), sort_keys=True)}
        blob = to_bytes({**(extra or {}), "state": self.data}, metadata=meta)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        fd = None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, path)
        except OSError as e:
            raise _save_error(path, e) from None
        finally:
            if fd is not None:
                os.close(fd)
            if os.path.lexists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path, model) -> "State":
        """Read a state saved by State.save, refusing one saved from a different model.

        Args:
            path: a file written by State.save.
            model: the Model the state will be used with.

        Raises:
            StateMismatchError: the file is not a regular file, not a state, corrupt
                (a malformed header, the wrong size, NaN or infinite values), or
                belongs to another model.
        """
        from .checks import first_nonfinite
        from .io import header_length, parse_header
        path = os.fspath(path)
        with open_input(path, "state file", StateMismatchError) as f:
            try:
                size = os.fstat(f.fileno()).st_size
                n = header_length(f.read(8), size, path)
                header = parse_header(f.read(n), size - 8 - n, path)
                meta = header.pop("__metadata__")
                entry = header.get("state")
                if meta.get("format") != "rwkvcpu-state" or entry is None:
                    raise StateMismatchError(f"{path}: not a state file saved by rwkvcpu")
                if meta.get("fingerprint") != model.fingerprint:
                    raise StateMismatchError(
                        f"{path}: this state was saved from a different model "
                        f"(fingerprint {meta.get('fingerprint', '?')[:12]!r}, this model {model.fingerprint[:12]}); "
                        f"load it with the model it came from")
                want = state_size(model.config)
                if entry["dtype"] != "F32" or entry["shape"] != [want]:
                    raise StateMismatchError(
                        f"{path}: holds a {entry['dtype']} state of shape {entry['shape']}, this model's is "
                        f"F32 [{want}]; the file is corrupt")
                begin, end = entry["data_offsets"]
                f.seek(8 + n + begin)
                raw = f.read(end - begin)
            except ModelFormatError as e:
                raise StateMismatchError(f"{e}; not a state file saved by rwkvcpu") from None
            except OSError as e:
                raise StateMismatchError(f"{path}: cannot read the state file ({os_reason(e)})") from None
        if len(raw) != end - begin:
            raise StateMismatchError(f"{path}: truncated state file")
        data = np.frombuffer(raw, "<f4").astype(np.float32)
        bad = first_nonfinite(data)
        if bad is not None:
            raise StateMismatchError(f"{path}: the state holds NaN or infinite values (the first at {bad}); "
                                     f"the file is corrupt")
        return cls(model.config, data, model.fingerprint)


def model_fingerprint(config: ModelConfig, source_sha256: str) -> str:
    """Identity of a model for states: its architecture and the checkpoint it came from.

    Different quantizations of one checkpoint share a fingerprint: a state
    saved with the int8 file may be resumed with the fp32 file.
    """
    meta = config.to_metadata()
    meta.pop("group_norm_eps", None)
    meta.pop("tokenizer", None)
    blob = json.dumps({"config": meta, "source": source_sha256}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
