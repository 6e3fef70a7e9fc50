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

# Tokens per block: the matrix products of a block are one call each (one GEMM
# for BLAS); longer prompts, and steps of more tokens, run block after block
# through the states. Bounds the work buffers at PROMPT_BLOCK rows.
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
        self.threads = threads_module.configure(threads_module.for_model(threads, self._bytes_per_token(tensors)))
        self.config = config
        self.metadata = dict(metadata)
        self.path = path
        self._arch = ARCHS[config.family]
        self._weights = common.load_weights(self._arch, config, common.Tensors(tensors))
        self._formats = sorted({v[0] for v in tensors.values() if isinstance(v, tuple)})
        self.fingerprint = model_fingerprint(config, self.metadata.get("source_sha256") or self._content_id(tensors))
        self._initial = self._initial_data(tensors)
        self._sections = common.section_offsets(config)
        self._workspace = common.Workspace(self._arch, config)
        self._lock = threading.Lock()
        self._tokenizer = None

    @staticmethod
    def _bytes_per_token(tensors) -> int:
        """Bytes of the tensors a decoded token reads (all but the embedding, which it looks up)."""
        total = 0
        for name, v in tensors.items():
            if not name.startswith("emb."):
                total += sum(np.asarray(a).nbytes for a in v[1].values()) if isinstance(v, tuple) else \
                    np.asarray(v).nbytes
        return total

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

        One sequence is the engine's smallest batch (see `step`): its tokens
        run in blocks of up to PROMPT_BLOCK, each matrix product one call over
        the block, the recurrence token by token. Every int8/int4 matrix, and
        every fp32/fp16 matrix under 1 MB, uses our own kernel for any block, so
        token t's numbers do not depend on the tokens around it: one token at a
        time and a whole prompt give the same logits and state to the bit.
        fp32/fp16 matrices of 1 MB and more take BLAS for blocks of several
        tokens, which sums in another order: there the two differ by float32
        rounding, bounded by a few ulps of the sums of |products| (the tests
        derive the bound per model).

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
        logits = np.empty((toks.shape[0] if all_logits else 1, self.config.vocab_size), np.float32)
        with self._lock:
            self._use_threads()
            # The State's flat array as a state array of one row: advanced in place.
            self._advance(new.data.reshape(1, -1), [0], [toks], logits, every_token=all_logits)
        self._check_logits(logits)
        return (logits if all_logits else logits[0]), new

    def _advance(self, states: np.ndarray, rows, token_arrays, logits, every_token: bool = False) -> None:
        """The engine: advance sequence b by token_arrays[b] from row rows[b] of `states`, in place.

        The tokens of all sequences are concatenated into blocks of at most
        PROMPT_BLOCK rows (a sequence longer than what is left of a block
        continues in the next one), and each block is one common.forward.

        Args:
            states: (C, state_floats) float32, C-contiguous.
            rows: B distinct state rows.
            token_arrays: B checked (n_b,) int64 arrays.
            logits: (B, V) float32: row b gets the logits after sequence b's last token;
                with every_token (one sequence), (n_0, V): the logits after each token.
        """
        lengths = [a.shape[0] for a in token_arrays]
        for pieces in _blocks(lengths, PROMPT_BLOCK):
            segs = np.empty((len(pieces), 3), np.int64)
            want, dest, end = [], [], 0
            for j, (b, t0, t1) in enumerate(pieces):
                start, end = end, end + t1 - t0
                segs[j] = (rows[b], start, end)
                if every_token:
                    want.extend(range(start, end))
                    dest.extend(range(t0, t1))
                elif t1 == lengths[b]:
                    want.append(end - 1)
                    dest.append(b)
            b, t0, t1 = pieces[0]
            toks = token_arrays[b][t0:t1] if len(pieces) == 1 else \
                np.concatenate([token_arrays[b][t0:t1] for b, t0, t1 in pieces])
            # Sequences finish in order, so the logits rows of a block are consecutive.
            out = logits[dest[0]:dest[-1] + 1] if dest else None
            common.forward(self._arch, self.config, self._weights, toks,
                           common.Sequences(states, segs, self._sections), self._workspace.work(end),
                           out, np.array(want, np.int64))

    # ------------------------------------------------- several sequences at once

    def state_pool(self, capacity: int):
        """A StatePool of `capacity` slots for sequences that step together (see rwkvcpu.batch)."""
        from .batch import StatePool
        return StatePool(self, capacity)

    def step(self, pool, batch) -> np.ndarray:
        """Advance several sequences, each in its own slot of `pool`, by one step.

        Each entry of `batch` is (slot, tokens): one token for a sequence that
        decodes, a chunk of its prompt for one that prefills; a step may mix both.
        The tokens of all entries form one block (blocks of PROMPT_BLOCK, when
        more): every weight matrix is read once for all of them, while token
        shift and the recurrences run per sequence on its slot of the pool, in
        place (no state is copied in or out).

        A sequence's logits and state are what `forward` gives for it alone:
        to the bit wherever our own kernels do the products (every int8/int4
        matrix, fp32/fp16 matrices under 1 MB); fp32/fp16 matrices of 1 MB and
        more take BLAS for blocks of several tokens, whose sums may round
        differently in another block (float32 rounding of the products' sums).

        Args:
            pool: a StatePool of this model (`state_pool`).
            batch: a sequence of (slot, tokens), each slot at most once, tokens as for `forward`.

        Returns:
            (len(batch), vocab_size) float32: row b is the logits after the last
            token of batch[b]. Unlike forward, a row that overflowed is returned
            as it is (NaN or infinite), so that it fails its own sequence only:
            Sampler.sample refuses it with a NonFiniteError.

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
        for slot in slots:
            pool.state(slot)    # raises for a slot not in use
        logits = np.empty((len(entries), self.config.vocab_size), np.float32)
        with self._lock:
            self._use_threads()
            self._advance(pool.data, slots, [toks for _, toks in entries], logits)
        # Not checked here: one sequence's overflow must not fail the others of its batch. Its row
        # reaches the sampler, which refuses it (NonFiniteError) for that sequence alone.
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

        Raises:
            NonFiniteError: some logits came out NaN or infinite, as forward.

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
        self._check_logits(logits)
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
        """The model's tokenizer (loaded on first use).

        Raises:
            ModelFormatError: the file's tokenizer metadata is unusable; the message names the file.
        """
        if self._tokenizer is None:
            from .tokenizers import load_tokenizer
            try:
                self._tokenizer = load_tokenizer(self.metadata)
            except ModelFormatError as e:
                raise ModelFormatError(f"{self.path}: {e}") from None
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


def _blocks(lengths, size: int):
    """Cut sequences of these lengths, in order, into blocks of at most `size` tokens.

    Yields:
        per block, a list of (sequence index, first token, end token): consecutive
        pieces of the sequences, a sequence cut where a block is full.

    Example:
        >>> list(_blocks([3, 1], 2))
        [[(0, 0, 2)], [(0, 2, 3), (1, 0, 1)]]
    """
    block, used = [], 0
    for b, n in enumerate(lengths):
        t = 0
        while t < n:
            take = min(n - t, size - used)
            block.append((b, t, t + take))
            used, t = used + take, t + take
            if used == size:
                yield block
                block, used = [], 0
    if block:
        yield block


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


def _with_tokenizer(meta: dict, tokenizer, vocab_size: int) -> dict:
    """A file's metadata naming another tokenizer (load's tokenizer=), checked against the vocabulary."""
    from .tokenizers import load_tokenizer, tokenizer_metadata, vocab_mismatch
    named = tokenizer_metadata(tokenizer)
    problem = vocab_mismatch(load_tokenizer(named), vocab_size, f"the tokenizer {tokenizer}")
    if problem:
        raise InvalidArgumentError(f"{problem}; pass a tokenizer of at most {vocab_size} tokens")
    # The file's end-of-text id belongs to the file's tokenizer: the new one brings its own.
    kept = {k: v for k, v in meta.items() if k not in ("tokenizer", "tokenizer_json", "eos_token_id")}
    return {**kept, **named}


def _model_file_in(folder: str) -> str:
    """The rwkvcpu file a folder holds, when its only *.safetensors is one; else the folder itself
    (a Hugging Face checkpoint to convert, or not a model: the converter's reader says which)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(files) == 1 and io.is_model_file(os.path.join(folder, files[0])):
        return os.path.join(folder, files[0])
    return folder


def load(path, *, dtype: Optional[str] = None, threads: Optional[int] = None,
         group_norm_eps: Optional[float] = None, tokenizer=None) -> Model:
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
        threads: threads to compute with; None means one per physical core, or one for a model
            reading under 64 MB of weights per token (rwkvcpu.threads.for_model). See
            rwkvcpu.threads.configure, applied for whichever thread calls forward().
        group_norm_eps: override the epsilon of the per-head group norm (v5+)
            recorded in the file, e.g. 64e-5 to match the reference `rwkv` package.
        tokenizer: "world", "neox-20b", "bytes", or the path of a Hugging Face
            tokenizer.json (as `rwkvcpu convert --tokenizer`), instead of the one the
            file names. None: the file's own; for other checkpoints the one their
            vocabulary size implies, or none at all when no built-in tokenizer fits:
            such a model runs token ids (`forward`, `step`), and `generate`/`chat`
            say that a tokenizer is needed.

    Returns:
        a Model.

    Raises:
        ModelFormatError (a ValueError): unreadable, foreign or misshapen file, or one
            holding NaN or infinite weights; the message names the file, tensor and shape.
        InvalidArgumentError: a bad dtype, threads or group_norm_eps; a tokenizer that is
            neither built in nor a usable tokenizer.json, or with more tokens than the model
            has logits.

    Example:
        >>> model = load("rwkv7-0.1b-int8.safetensors", threads=2)
        >>> model.info["generation"]
        'v7'
        >>> model = load("RWKV-x070-custom.pth", tokenizer="my-tokenizer.json")   # converted in memory
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
        # The one place the engine calls the converter: a checkpoint that is not ours.
        from .quant.convert import read_checkpoint
        meta, arrays = read_checkpoint(path, dtype=dtype or DEFAULT_DTYPE, group_norm_eps=group_norm_eps,
                                       tokenizer=tokenizer, tokenizer_optional=True)
        meta = {k: str(v) for k, v in meta.items()}
        config = ModelConfig.from_metadata(meta, path)
        dtype = tokenizer = None
    if tokenizer is not None:
        meta = _with_tokenizer(meta, tokenizer, config.vocab_size)
        config = config.replace(tokenizer=meta["tokenizer"])
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
