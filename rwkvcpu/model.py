"""Loading a model and running it: `load`, `Model`, and the one generation dispatch (ARCHS).

Example:
    >>> import rwkvcpu
    >>> model = rwkvcpu.load("rwkv7-0.1b-int8.safetensors")
    >>> logits, state = model.forward([510, 1563, 310])     # a prompt, all at once
    >>> logits, state = model.forward([int(logits.argmax())], state)   # then one token at a time
"""

from __future__ import annotations

import hashlib
import os
import reprlib
import threading
from typing import Optional

import numpy as np

from . import io
from . import threads as threads_module
from .checks import check_weights, first_nonfinite
from .config import ModelConfig, check_group_norm_eps
from .errors import InvalidArgumentError, ModelFormatError, NonFiniteError, StateMismatchError
from .generations import common, v4, v5, v6, v7
from .state import State, model_fingerprint, state_size

# The one place that maps a generation to the code that runs it (by family:
# the minor versions of v5 differ only in which tensors the file holds).
ARCHS = {"v4": v4, "v5": v5, "v6": v6, "v7": v7}

# Tokens per block on the sequence path: the matrix products of a block are one
# GEMM each; longer prompts are run block after block through the state.
PROMPT_BLOCK = 256

# What an out-of-file checkpoint is converted to when load() is not told.
DEFAULT_DTYPE = "int8"


class Model:
    """An RWKV model ready to run on the CPU.

    Attributes:
        config: the ModelConfig (generation, dimensions, group-norm epsilon, tokenizer).
        metadata: the file's metadata (str -> str).
        fingerprint: identity of the checkpoint and architecture; states carry it.
        info: a summary dict (see `info`).
        path: the file the model came from.

    A Model is safe to share between threads (calls to forward take turns),
    but each sequence needs its own State.
    """

    def __init__(self, config: ModelConfig, metadata: dict, tensors: dict, *, path: str, threads=None):
        self.threads = threads_module.configure(threads)
        self.config = config
        self.metadata = dict(metadata)
        self.path = path
        self._arch = ARCHS[config.family]
        self._weights = common.load_weights(self._arch, config, common.Tensors(tensors))
        self._formats = sorted({v[0] for v in tensors.values() if isinstance(v, tuple)})
        self.fingerprint = model_fingerprint(config, self.metadata.get("source_sha256") or self._content_id(tensors))
        self._initial = self._initial_data(tensors)
        self._scratch = common.Scratch()
        self._lock = threading.Lock()
        self._tokenizer = None

    # ----------------------------------------------------------------- state

    def _initial_data(self, tensors) -> np.ndarray:
        state = State.zeros(self.config, "")
        for i in range(self.config.n_layer):
            ts = tensors.get(f"blocks.{i}.att.time_state")
            if ts is not None:
                # Stored in the state's own index order ([head, key, value] for v5/v6, [head, value, key] for v7).
                state.wkv[i] = ts
        data = state.data
        data.flags.writeable = False
        return data

    @staticmethod
    def _content_id(tensors) -> str:
        """Identity of a file without a recorded source checksum: a hash of a sample of its values."""
        h = hashlib.sha256()
        for name in sorted(tensors):
            v = tensors[name]
            arrays = v[1].values() if isinstance(v, tuple) else (v,)
            for a in arrays:
                flat = np.ascontiguousarray(a).reshape(-1)
                h.update(name.encode())
                h.update(flat[:256].tobytes())
                h.update(flat[-256:].tobytes())
        return h.hexdigest()

    def initial_state(self) -> State:
        """The state before any token: zeros (v4: its running exponent at "minus
        infinity"), or the state-tuned `att.time_state` tensors when the file has them.

        Returns:
            a new State; changing it does not change the model.
        """
        return State(self.config, self._initial.copy(), self.fingerprint)

    # --------------------------------------------------------------- running

    def forward(self, tokens, state: Optional[State] = None, *, all_logits: bool = False):
        """Run tokens through the model.

        One token runs the one-token path (matrix-vector products); several run
        the sequence path (one matrix product per weight for a block of up to
        PROMPT_BLOCK tokens, the recurrence token by token). Both use the same
        kernel for each int8/int4 matrix and for fp32/fp16 matrices under 1 MB,
        so they give the same numbers to the bit there; larger fp32/fp16 matrices
        take BLAS for a block of tokens, which sums in another order (within 1e-5).

        Args:
            tokens: a non-empty sequence of int token ids in [0, vocab_size).
            state: where to continue from; None means `initial_state()`. It is not
                modified.
            all_logits: also return the logits after every token, not just the last.

        Returns:
            (logits, state): float32 logits of shape (vocab_size,) for the next
            token after the last one (with all_logits: (len(tokens), vocab_size),
            row t predicting the token after tokens[t]), and the new State.

        Raises:
            ValueError (InvalidArgumentError, StateMismatchError): no tokens, an id out of
                range, or a state of another model or shape; raised before any work.
            NonFiniteError: the logits came out NaN or infinite (weights or state
                overflowing float32); the state passed in is unchanged.

        Example:
            >>> logits, state = model.forward([510, 1563])
            >>> logits, state = model.forward([310], state)
        """
        toks = self._check_tokens(tokens)
        new = self.initial_state() if state is None else self._check_state(state)
        T, V = toks.shape[0], self.config.vocab_size
        logits = np.empty((T if all_logits else 1, V), np.float32)
        with self._lock:
            self._use_threads()
            for t0 in range(0, T, PROMPT_BLOCK):
                block = toks[t0:t0 + PROMPT_BLOCK]
                if all_logits:
                    out = logits[t0:t0 + block.shape[0]]
                else:
                    out = logits if t0 + PROMPT_BLOCK >= T else None
                common.forward(self._arch, self.config, self._weights, block, new, self._scratch, out)
        self._check_logits(logits)
        return (logits if all_logits else logits[0]), new

    # ------------------------------------------------- several sequences at once

    def state_pool(self, capacity: int):
        """A StatePool of `capacity` slots for sequences that step together (see rwkvcpu.batch)."""
        from .batch import StatePool
        return StatePool(self, capacity)

    def step(self, pool, batch) -> np.ndarray:
        """Advance several sequences, each in its own slot of `pool`, by one step.

        Each entry of `batch` is (slot, tokens): one token for a sequence that
        decodes, a chunk of its prompt for one that prefills; a step may mix both.
        The slots' states are advanced in place.

        Args:
            pool: a StatePool of this model (`state_pool`).
            batch: a sequence of (slot, tokens), each slot at most once, tokens as for `forward`.

        Returns:
            (len(batch), vocab_size) float32: row b is the logits after the last
            token of batch[b], equal to what `forward` gives for that sequence alone.

        Raises:
            InvalidArgumentError: an empty batch, a slot given twice or not in use,
                bad tokens; raised before any state changes.

        Example:
            >>> pool = model.state_pool(2)
            >>> a, b = pool.acquire(), pool.acquire()
            >>> logits = model.step(pool, [(a, [510, 1563]), (b, [310])])
        """
        if pool.model is not self:
            raise InvalidArgumentError("this state pool belongs to another model; make one with model.state_pool(n)")
        entries = [(slot, self._check_tokens(tokens)) for slot, tokens in batch]
        if not entries:
            raise InvalidArgumentError("an empty batch: give at least one (slot, tokens) entry")
        slots = [slot for slot, _ in entries]
        if len(set(slots)) != len(slots):
            raise InvalidArgumentError("a slot appears twice in one batch: give each sequence once per step")
        states = [pool.state(slot) for slot in slots]
        logits = np.empty((len(entries), self.config.vocab_size), np.float32)
        with self._lock:
            self._use_threads()
            # One sequence at a time for now; each gives exactly what forward() gives.
            for b, ((_, toks), state) in enumerate(zip(entries, states)):
                for t0 in range(0, toks.shape[0], PROMPT_BLOCK):
                    last = t0 + PROMPT_BLOCK >= toks.shape[0]
                    common.forward(self._arch, self.config, self._weights, toks[t0:t0 + PROMPT_BLOCK], state,
                                   self._scratch, logits[b:b + 1] if last else None)
        self._check_logits(logits)
        return logits

    def forward_batch(self, token_lists, states=None):
        """`forward` for several independent sequences at once (one step of `step`).

        Args:
            token_lists: a sequence of token-id sequences, one per sequence.
            states: None, or a sequence as long as token_lists of State or None
                (None: the initial state). They are not modified.

        Returns:
            (logits, states): a list of (vocab_size,) float32 logits and a list of
            new States, one per sequence, each equal to `forward(tokens, state)`.

        Example:
            >>> logits, states = model.forward_batch([[510, 1563], [310]])
        """
        token_lists = list(token_lists)
        states = [None] * len(token_lists) if states is None else list(states)
        if len(states) != len(token_lists):
            raise InvalidArgumentError(
                f"forward_batch got {len(token_lists)} token lists and {len(states)} states; give one state "
                f"(or None) per sequence")
        if not token_lists:
            raise InvalidArgumentError("forward_batch needs at least one token list")
        pool = self.state_pool(len(token_lists))
        slots = [pool.acquire(s) for s in states]
        logits = self.step(pool, list(zip(slots, token_lists)))
        return list(logits), [pool.snapshot(s) for s in slots]

    def __call__(self, tokens, state=None, **kw):
        return self.forward(tokens, state, **kw)

    def _check_logits(self, logits) -> None:
        # V floats per token: nothing next to computing them, and a NaN must not pass silently.
        if first_nonfinite(logits) is not None:
            raise NonFiniteError(
                f"{self.path}: the model computed NaN or infinite logits: its weights, or the state this call "
                f"continued from, overflow float32; this model cannot be run on this input")

    def _use_threads(self):
        # numba's thread count is per calling thread; set it for whichever thread runs us.
        if threads_module.current() != self.threads:
            threads_module.configure(self.threads)

    def _check_tokens(self, tokens) -> np.ndarray:
        V = self.config.vocab_size
        if isinstance(tokens, (str, bytes)):
            raise InvalidArgumentError(
                "tokens must be a sequence of integer token ids, not text; "
                "encode the text first, e.g. model.forward(model.tokenizer.encode(text))")
        try:
            a = np.asarray(tokens)
        except (ValueError, TypeError, OverflowError):
            raise InvalidArgumentError("tokens must be a flat sequence of integer token ids, e.g. [510, 1563]") from None
        if a.ndim == 0:
            if a.dtype.kind in "iu":
                raise InvalidArgumentError(f"tokens must be a sequence of token ids; for one token pass [{int(a)}]")
            raise InvalidArgumentError(
                f"tokens must be a sequence of integer token ids, e.g. [510, 1563], got {reprlib.repr(tokens)}")
        if a.ndim != 1:
            raise InvalidArgumentError(f"tokens must be a flat sequence of token ids, got an array of shape {a.shape}")
        if a.size == 0:
            raise InvalidArgumentError(
                "no tokens: pass at least one token id (the state before any token is model.initial_state())")
        if a.dtype.kind not in "iu":
            raise InvalidArgumentError(
                f"token ids must be integers in [0, {V - 1}], got {a.dtype} values; pass a list of ints")
        bad = np.flatnonzero((a < 0) | (a >= V))
        if bad.size:
            p = int(bad[0])
            raise InvalidArgumentError(
                f"token id {int(a[p])} at position {p} is outside this model's vocabulary: "
                f"pass ids in [0, {V - 1}]")
        return a.astype(np.int64, copy=False)

    def _check_state(self, state) -> State:
        if not isinstance(state, State):
            raise StateMismatchError(
                f"state must be a State from model.initial_state() or model.forward(), got {type(state).__name__}")
        size = state_size(self.config)
        data = state.data
        if not isinstance(data, np.ndarray) or data.dtype != np.float32 or data.ndim != 1 or data.size != size:
            shape = getattr(data, "shape", "?")
            raise StateMismatchError(
                f"state holds {getattr(data, 'dtype', '?')} {shape}, this model's state is float32 ({size},); "
                f"pass a State from this model's initial_state() or forward()")
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"this state belongs to a different model (fingerprint {state.fingerprint[:12]}, this model "
                f"{self.fingerprint[:12]}); pass a State from this model's initial_state() or forward()")
        return State(self.config, data.copy(), self.fingerprint)

    # ------------------------------------------------------------ describing

    @property
    def info(self) -> dict:
        """generation, dimensions, dtype, vocabulary size and tokenizer, as a dict."""
        c = self.config
        return {
            "generation": c.generation,
            "n_layer": c.n_layer,
            "n_embd": c.n_embd,
            "dim_ffn": c.dim_ffn,
            "head_size": c.head_size,
            "n_head": c.n_head,
            "vocab_size": c.vocab_size,
            "dtype": self.metadata.get("dtype") or (self._formats[0] if len(self._formats) == 1 else "mixed"),
            "matrix_formats": self._formats,
            "group_norm_eps": c.group_norm_eps,
            "tokenizer": c.tokenizer,
            "state_floats": state_size(c),
            "path": self.path,
        }

    def __repr__(self):
        c = self.config
        return (f"Model({c.generation}, L={c.n_layer}, D={c.n_embd}, V={c.vocab_size}, "
                f"{self.info['dtype']}, {os.path.basename(self.path)!r})")

    # ----------------------------------------- text (rwkvcpu.tokenizers / generate)

    @property
    def tokenizer(self):
        """The model's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from .tokenizers import load_tokenizer
            self._tokenizer = load_tokenizer(self.metadata)
        return self._tokenizer

    def generate(self, prompt, **sampling):
        """Iterator of text chunks continuing `prompt`; see rwkvcpu.generate.generate."""
        from .generate import generate
        return generate(self, prompt, **sampling)

    def complete(self, prompt, **sampling) -> str:
        """The continuation of `prompt` as one string; see rwkvcpu.generate.complete."""
        from .generate import complete
        return complete(self, prompt, **sampling)

    def chat_session(self, **sampling):
        """A multi-turn chat keeping its state; see rwkvcpu.generate.ChatSession."""
        from .generate import ChatSession
        return ChatSession(self, **sampling)


def _requantize(tensors: dict, dtype: str) -> dict:
    """Store every matrix in `dtype` (dequantizing and quantizing again where it differs)."""
    from .formats import format_for_matrix, get_format
    out = {}
    for name, v in tensors.items():
        if isinstance(v, tuple):
            fmt, parts = v
            w = get_format(fmt).dequantize(parts)
            target = format_for_matrix(dtype, w.shape)
            v = (fmt, parts) if target == fmt else (target, get_format(target).quantize(w))
        out[name] = v
    return out


def _model_file_in(folder: str) -> str:
    """The rwkvcpu file a folder holds, when its only *.safetensors is one; else the folder itself
    (a Hugging Face checkpoint to convert, or not a model: the converter's reader says which)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(files) == 1 and io.is_model_file(os.path.join(folder, files[0])):
        return os.path.join(folder, files[0])
    return folder


def load(path, *, dtype: Optional[str] = None, threads: Optional[int] = None,
         group_norm_eps: Optional[float] = None) -> Model:
    """Load a model.

    An rwkvcpu safetensors file (written by `rwkvcpu convert`) is memory-mapped:
    nothing is copied into RAM, and processes share its pages. Any other
    checkpoint rwkvcpu can read (official .pth, rwkv.cpp .bin, Hugging Face
    folder) is converted in memory first, to `dtype` (default int8).

    Args:
        path: the model file, or a folder: a Hugging Face checkpoint, or one holding a single
            .safetensors file that is an rwkvcpu model (that file is loaded).
        dtype: "fp32", "fp16", "int8" or "int4". For an rwkvcpu file, None keeps
            the stored format; another value re-quantizes the matrices in memory
            (from a quantized file this adds to its rounding error: prefer
            converting the original checkpoint). For other checkpoints, None
            means "int8".
        threads: threads to compute with; None means one per physical core
            (see rwkvcpu.threads.configure, applied for whichever thread calls forward()).
        group_norm_eps: override the epsilon of the per-head group norm (v5+)
            recorded in the file, e.g. 64e-5 to match the reference `rwkv` package.

    Returns:
        a Model.

    Raises:
        ModelFormatError (a ValueError): unreadable, foreign or misshapen file, or one
            holding NaN or infinite weights; the message names the file, tensor and shape.
        InvalidArgumentError: a bad dtype, threads or group_norm_eps.

    Example:
        >>> model = load("rwkv7-0.1b-int8.safetensors", threads=2)
        >>> model.info["generation"]
        'v7'
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFormatError(f"{path}: no such file or directory")
    if dtype is not None:
        from .formats import get_format
        get_format(dtype)
    if group_norm_eps is not None:
        group_norm_eps = check_group_norm_eps(group_norm_eps, InvalidArgumentError)
    if os.path.isdir(path):
        path = _model_file_in(path)
    mapped = os.path.isfile(path) and io.is_model_file(path)
    if mapped:
        meta, arrays = io.open_safetensors(path)
        config = io.check_metadata(meta, path)
    else:
        from .quant.convert import read_checkpoint
        meta, arrays = read_checkpoint(path, dtype=dtype or DEFAULT_DTYPE, group_norm_eps=group_norm_eps)
        meta = {k: str(v) for k, v in meta.items()}
        config = ModelConfig.from_metadata(meta, path)
        dtype = None
    if group_norm_eps is not None:
        config = config.replace(group_norm_eps=float(group_norm_eps))
        meta["group_norm_eps"] = repr(float(group_norm_eps))
    tensors = io.check_tensors(config, arrays, path)
    if mapped:
        # Converted checkpoints were checked tensor by tensor as they were read.
        check_weights(tensors, path)
    if dtype is not None and dtype != meta.get("dtype"):
        tensors = _requantize(tensors, dtype)
        meta["dtype"] = dtype
    return Model(config, meta, tensors, path=path, threads=threads)
