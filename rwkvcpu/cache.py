"""States kept at prompt boundaries, keyed by the exact tokens before them (the server's prefix cache).

An RWKV state is the same size after 10 or 100,000 tokens, so keeping the state
after a system prompt or after a chat turn costs a fixed number of bytes, and a
later request that starts with the same tokens resumes from it and feeds only
the rest. Entries are looked up by the longest cached prefix of a prompt, evicted
least recently used first when their bytes pass a budget, and optionally kept
in a folder as state files (`State.save` files with the tokens beside the state)
that a restarted server reads back.

Example:
    >>> cache = StateCache(model, max_bytes=512 << 20)
    >>> cache.put(tokens[:120], state_after_120_tokens)
    >>> n, state = cache.longest_prefix(tokens)      # (120, a copy of that State), or (0, None)
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from .errors import InvalidArgumentError, RwkvCpuError
from .state import State

log = logging.getLogger("rwkvcpu.cache")

# Suffix of the files a persistent cache writes; the stem is the tokens' hash.
SUFFIX = ".state"


def _key(tokens) -> bytes:
    """Dictionary key of a token prefix: its ids as little-endian int32 bytes (exact, no hash collisions)."""
    return np.asarray(tokens, dtype="<i4").tobytes()


class _Entry:
    __slots__ = ("tokens", "data", "nbytes")

    def __init__(self, tokens: np.ndarray, data: np.ndarray):
        self.tokens = tokens        # (n,) int32
        self.data = data            # (state_floats,) float32, read-only
        self.nbytes = data.nbytes + tokens.nbytes


class StateCache:
    """States after exact token prefixes, bounded in bytes (least recently used out first).

    Args:
        model: the Model whose states are kept (its fingerprint tags the files).
        max_bytes: budget for the states and their keys; 0 keeps nothing.
        directory: optional folder: every entry is also written there as a state
            file, and the files already there (of this model) are read at start, most
            recent last, as far as the budget allows.

    Thread-safe: the scheduler's thread puts and looks up; statistics are read from others.

    Attributes:
        hits, misses: lookups that found a prefix, or none.
        hit_tokens: tokens that lookups did not need to feed again.
    """

    def __init__(self, model, max_bytes: int, directory: Optional[str] = None):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidArgumentError(f"the state cache's size must be a number of bytes >= 0, got {max_bytes!r}")
        self.model = model
        self.max_bytes = max_bytes
        self.directory = os.fspath(directory) if directory is not None else None
        self.hits = self.misses = self.hit_tokens = 0
        self._entries: "OrderedDict[bytes, _Entry]" = OrderedDict()
        self._lengths: dict[int, int] = {}          # prefix length -> entries of that length
        self._bytes = 0
        self._lock = threading.Lock()
        if self.directory is not None:
            self._files: "queue.Queue" = queue.Queue()
            self._open_directory()
            self._writer = threading.Thread(target=self._file_worker, name="rwkvcpu-cache-files", daemon=True)
            self._writer.start()

    # ------------------------------------------------------------- lookups

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens) -> bool:
        return _key(tokens) in self._entries

    def longest_prefix(self, tokens: Sequence[int], *, limit: Optional[int] = None, count: bool = True):
        """The longest cached prefix of `tokens`.

        Args:
            tokens: a prompt's token ids.
            limit: consider only prefixes at most this long (e.g. len(tokens) - 1,
                so that at least one token is left to give the next logits).
            count: add the lookup to hits/misses (False for the server's own bookkeeping).

        Returns:
            (n, State): the prefix length and a copy of its state; (0, None) when none is cached.
        """
        arr = np.asarray(tokens, dtype="<i4")
        top = arr.shape[0] if limit is None else min(limit, arr.shape[0])
        with self._lock:
            for n in sorted((n for n in self._lengths if 0 < n <= top), reverse=True):
                entry = self._entries.get(arr[:n].tobytes())
                if entry is not None:
                    self._entries.move_to_end(entry.tokens.tobytes())
                    if count:
                        self.hits += 1
                        self.hit_tokens += n
                    return n, State(self.model.config, entry.data.copy(), self.model.fingerprint)
            self.misses += count
        return 0, None

    # ------------------------------------------------------------- updates

    def put(self, tokens: Sequence[int], state: State) -> bool:
        """Keep a copy of `state`, the state after exactly `tokens`.

        Returns:
            True if it was added (False: already there, or larger than the whole budget).
        """
        arr = np.array(tokens, dtype="<i4")
        data = np.array(state.data, np.float32)
        data.flags.writeable = False
        return self._add(arr, data, persist=True)

    def clear(self) -> None:
        """Drop every entry (and its file)."""
        with self._lock:
            keys = list(self._entries)
        for k in keys:
            with self._lock:
                self._drop(k)

    def _add(self, tokens: np.ndarray, data: np.ndarray, persist: bool) -> bool:
        if tokens.shape[0] == 0:
            return False
        entry = _Entry(tokens, data)
        key = tokens.tobytes()
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return False
            if entry.nbytes > self.max_bytes:
                return False
            while self._bytes + entry.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = entry
            self._bytes += entry.nbytes
            n = tokens.shape[0]
            self._lengths[n] = self._lengths.get(n, 0) + 1
        if persist and self.directory is not None:
            self._write(entry)
        return True

    def _drop(self, key: bytes) -> None:
        """Remove one entry; the caller holds the lock."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry.nbytes
        n = entry.tokens.shape[0]
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
        if self.directory is not None:
            self._files.put(("remove", entry))

    # ---------------------------------------------------------- persistence

    def _path(self, tokens: np.ndarray) -> str:
        return os.path.join(self.directory, hashlib.sha256(tokens.tobytes()).hexdigest()[:32] + SUFFIX)

    def _write(self, entry: _Entry) -> None:
        self._files.put(("write", entry))

    def _file_worker(self) -> None:
        """Writes and removes the files in order, off the caller's thread (a save waits for the disk)."""
        while True:
            op, entry = self._files.get()
            try:
                if op == "stop":
                    return
                path = self._path(entry.tokens)
                if op == "write":
                    # State.save's format, the prompt's tokens beside the state; a failure is logged,
                    # not raised: the cache still works in memory.
                    state = State(self.model.config, np.array(entry.data), self.model.fingerprint)
                    state.save(path, extra={"tokens": entry.tokens})
                elif os.path.exists(path):
                    os.remove(path)
            except (RwkvCpuError, OSError) as e:
                log.warning("state cache: %s", e)
            finally:
                self._files.task_done()

    def flush(self) -> None:
        """Wait until every file write and removal asked for so far is done."""
        if self.directory is not None:
            self._files.join()

    def close(self) -> None:
        """Finish the pending file work and stop the writer thread (the entries stay usable in memory)."""
        if self.directory is not None and self._writer.is_alive():
            self._files.put(("stop", None))
            self._writer.join()

    def _open_directory(self) -> None:
        from safetensors import safe_open
        try:
            os.makedirs(self.directory, exist_ok=True)
            names = [n for n in os.listdir(self.directory) if n.endswith(SUFFIX)]
        except OSError as e:
            raise InvalidArgumentError(f"{self.directory}: cannot use it for the state cache ({e.strerror or e})") \
                from None
        paths = [os.path.join(self.directory, n) for n in names]
        # Oldest first, so that the most recently written files end up most recently used.
        paths.sort(key=lambda p: os.path.getmtime(p))
        loaded = 0
        for path in paths:
            try:
                state = State.load(path, self.model)
                with safe_open(path, "np") as f:
                    tokens = np.ascontiguousarray(f.get_tensor("tokens"), dtype="<i4")
            except Exception as e:  # another model's file, a foreign or damaged one: skip it, say so
                log.warning("state cache: skipping %s (%s)", path, e)
                continue
            data = state.data
            data.flags.writeable = False
            if self._add(tokens.reshape(-1), data, persist=False):
                loaded += 1
        if loaded:
            log.info("state cache: %d states read from %s (%.1f MB)", loaded, self.directory, self._bytes / 1e6)
