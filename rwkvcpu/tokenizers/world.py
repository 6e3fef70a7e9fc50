"""The RWKV World tokenizer: greedy longest match over bytes.

Token-for-token identical to the reference ``TRIE_TOKENIZER`` of the ``rwkv``
package (tests/test_tokenizer_world.py checks it), with the trie held in flat
arrays and the matching loop compiled by Numba (rwkvcpu/tokenizers/trie.py).

Vocabulary file format, one token a line: ``<id> <python literal> <byte length>``,
the literal a ``str`` (stored as its UTF-8 bytes) or ``bytes``. Id 0 is not in
the file: it is the end-of-text token.
"""

from __future__ import annotations

import ast
import codecs
import os
from typing import Iterable

import numba
import numpy as np

from ..errors import ModelFormatError
from . import trie
from .base import Tokenizer, text_bytes

WORLD_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rwkv_vocab_v20230424.txt")
# RWKV World models have 65536 logits; ids past the vocabulary file decode to nothing.
WORLD_VOCAB_SIZE = 65536
END_OF_TEXT = 0


def _literal_bytes(literal: str) -> bytes:
    """Bytes of a token's Python literal: 'text' (as UTF-8) or b'bytes'.

    Decoded with the unicode_escape codec, several times faster than
    ast.literal_eval; read_vocab checks every result against the declared
    length and falls back to literal_eval on any disagreement.
    """
    if literal[:1] == "b":
        return codecs.decode(literal[2:-1].encode("latin-1"), "unicode_escape").encode("latin-1")
    # backslashreplace turns characters past latin-1 into \u escapes the codec reads back
    text = codecs.decode(literal[1:-1].encode("latin-1", "backslashreplace"), "unicode_escape")
    return text.encode("utf-8")


def _malformed(path, n, why) -> ModelFormatError:
    return ModelFormatError(f"{path}:{n}: malformed vocabulary line ({why})")


def read_vocab(path: str) -> dict[int, bytes]:
    """Parse a World vocabulary file into id -> token bytes.

    Raises:
        ModelFormatError: a line is malformed or its byte length disagrees.
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read the tokenizer vocabulary ({e.strerror})") from None
    vocab = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        if first < 0 or last <= first:
            raise _malformed(path, n, "expected '<id> <literal> <length>'")
        try:
            i, literal, length = int(line[:first]), line[first + 1:last], int(line[last + 1:])
            try:
                token = _literal_bytes(literal)
            except (UnicodeError, ValueError):
                token = b""
            if len(token) != length:
                value = ast.literal_eval(literal)
                token = value.encode("utf-8") if isinstance(value, str) else value
        except (ValueError, SyntaxError) as e:
            raise _malformed(path, n, e) from None
        if not isinstance(token, bytes) or len(token) != length:
            raise _malformed(path, n, f"token {i} is {token!r}, expected {length} bytes")
        vocab[i] = token
    return vocab


class ByteTrie:
    """Greedy longest-match encoder over a set of byte strings.

    Attributes:
        table: the packed double-array trie (layout in rwkvcpu/tokenizers/trie.py).
        n_nodes: trie nodes, root included.
        every_byte: every single byte is a token, so any input encodes.

    Example:
        >>> ByteTrie({1: b"a", 2: b"ab", 3: b"b"}).encode(b"abb")
        [2, 3]
    """

    def __init__(self, vocab: dict[int, bytes]):
        # As in the reference, a byte string listed twice keeps its last id.
        by_bytes = {token: i for i, token in sorted(vocab.items())}
        tokens = sorted(t for t in by_bytes if t)
        if not tokens:
            raise ModelFormatError("the vocabulary holds no tokens")
        blob = np.frombuffer(b"".join(tokens), np.uint8)
        offsets = np.zeros(len(tokens) + 1, np.int64)
        offsets[1:] = np.cumsum([len(t) for t in tokens])
        ids = np.array([by_bytes[t] for t in tokens], np.int32)

        n_nodes = trie.count_trie_nodes(blob, offsets)
        path = np.zeros(max(map(len, tokens)) + 1, np.int32)
        edge_parent = np.empty(n_nodes - 1, np.int32)
        edge_byte = np.empty(n_nodes - 1, np.uint8)
        node_token = np.empty(n_nodes, np.int32)
        trie.build_trie_edges(blob, offsets, ids, path, edge_parent, edge_byte, node_token)
        # Edge k created node k + 1; within a parent, edges already come in byte order.
        order = np.argsort(edge_parent, kind="stable")
        child_start = np.zeros(n_nodes + 1, np.int64)
        child_start[1:] = np.cumsum(np.bincount(edge_parent, minlength=n_nodes))

        cell_of, queue = np.empty(n_nodes, np.int64), np.empty(n_nodes, np.int64)
        capacity = n_nodes + 512
        while True:
            table = np.empty(trie.CELLS + 3 * capacity, np.int32)
            cells = table[trie.CELLS:].reshape(capacity, 3)
            used = trie.build_double_array(child_start, edge_byte[order], (order + 1).astype(np.int32),
                                           node_token, cells, cell_of, queue)
            if used >= 0:
                break
            capacity *= 2
        table = table[:trie.CELLS + 3 * (used + 256)].copy()
        trie.fill_level2(table[trie.CELLS:].reshape(-1, 3), table[:trie.CELLS])
        # Shared by every thread that encodes: never written after this point.
        table.flags.writeable = False
        self.table = table
        self.n_nodes = n_nodes
        self.every_byte = len(set(tokens) & {bytes([b]) for b in range(256)}) == 256
        # The compiled kernel itself, skipping numba's per-call type dispatch
        # (a quarter of the cost of encoding a short string): every call
        # passes exactly these types, bytes and this table.
        self._encode = trie.encode_greedy.compile((numba.typeof(b""), numba.typeof(table)))

    def encode(self, data: bytes) -> list[int]:
        """Token ids of a byte string (greedy longest match, left to right).

        Raises:
            ModelFormatError: no token of the vocabulary starts with some byte of `data`.
        """
        ids = self._encode(data, self.table)
        if ids and ids[-1] < 0:
            raise ModelFormatError(f"no token in the vocabulary starts with byte {data[-ids[-1] - 1]:#04x}")
        return ids


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer (``rwkv_vocab_v20230424``), shipped inside the package.

    Example:
        >>> tok = WorldTokenizer()
        >>> tok.encode("Hello world")
        [33155, 40213]
        >>> tok.decode([33155, 40213])
        'Hello world'
    """

    name = "world"
    eos_token_id = END_OF_TEXT

    def __init__(self, path: str = WORLD_VOCAB_FILE):
        vocab = read_vocab(path)
        self.vocab_size = max(WORLD_VOCAB_SIZE, max(vocab) + 1)
        self._bytes = [b""] * self.vocab_size
        for i, token in vocab.items():
            self._bytes[i] = token
        self._trie = ByteTrie(vocab)
        if not self._trie.every_byte:
            raise ModelFormatError(f"{path}: the vocabulary lacks some single bytes; every text could not be encoded")
        # Every byte is a token, so the kernel never reports a failure: call it directly.
        self._encode, self._table = self._trie._encode, self._trie.table

    def encode(self, text: str) -> list[int]:
        # Bytes that were not UTF-8 in the source (surrogate-escaped) are encoded as those bytes.
        return self._encode(text_bytes(text), self._table)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (any bytes, valid UTF-8 or not)."""
        return self._trie.encode(bytes(data))

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            self.check_ids([token])
        return self._bytes[token]

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join([table[t] for t in self.check_ids(tokens)])
