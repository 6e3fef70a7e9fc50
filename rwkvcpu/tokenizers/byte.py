"""Byte-level tokenizer of vocabulary-256 models: token id = byte value."""

from __future__ import annotations

from typing import Iterable

from .base import Tokenizer, text_bytes


class ByteTokenizer(Tokenizer):
    """Token id = byte value of the UTF-8 text (the tiny rwkv.cpp test models).

    Example:
        >>> ByteTokenizer().encode("hé")
        [104, 195, 169]
    """

    name = "bytes"
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text_bytes(text))

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < 256:
            self.check_ids([token])
        return bytes((token,))

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return bytes(self.check_ids(tokens))
