"""Any Hugging Face ``tokenizer.json``, through the ``tokenizers`` library.

Used for the 20B (GPT-NeoX / Pile) tokenizer of RWKV-4 Pile and Raven models,
shipped inside the package, and for a tokenizer.json embedded in a model
file's metadata. Encoding and decoding are the library's own. For byte-level
BPE vocabularies (GPT-2 style, the 20B one among them) each token's bytes are
known, so streaming holds back partial characters byte-exactly; other
vocabularies stream by decoding a short window of tokens.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Iterable, Optional

from ..errors import ModelFormatError
from .base import StreamDecoder, TextStreamDecoder, Tokenizer, utf8_text

NEOX_20B_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "20B_tokenizer.json")

# Special tokens that end a document, by the names common vocabularies give them.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|end|>")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _is_byte_level(decoder: Optional[dict]) -> bool:
    return bool(decoder) and decoder.get("type") == "ByteLevel"


class HFTokenizer(Tokenizer):
    """A tokenizer.json, encoded and decoded by the ``tokenizers`` library.

    Args:
        tokenizer_json: the whole tokenizer.json, as a string.
        name: how the model file names it ("neox-20b" or "embedded").
        eos_token_id: the end-of-text token; by default the special token
            named like one (``<|endoftext|>``, ``</s>``, ...), or None.

    Example:
        >>> tok = HFTokenizer(open("tokenizer.json").read())
        >>> tok.decode(tok.encode("Hello world"))
        'Hello world'
    """

    def __init__(self, tokenizer_json: str, name: str = "embedded", eos_token_id: Optional[int] = None):
        from tokenizers import Tokenizer as _HF
        try:
            spec = json.loads(tokenizer_json)
            self._hf = _HF.from_str(tokenizer_json)
        except Exception as e:  # the library raises plain Exception subclasses
            raise ModelFormatError(f"{name} tokenizer: not a valid tokenizer.json ({e})") from None
        self.name = name
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        added = {t["id"]: t for t in spec.get("added_tokens") or []}
        if eos_token_id is None:
            eos_token_id = next((i for i, t in sorted(added.items())
                                 if t.get("special") and t.get("content") in EOS_NAMES), None)
        self.eos_token_id = eos_token_id
        self._bytes = self._byte_table(vocab, added) if _is_byte_level(spec.get("decoder")) else None
        # Byte-level vocabularies know each token's bytes exactly (token_bytes); others decode whole sequences.
        self.byte_level = self._bytes is not None

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer.json, as the library serialises it (for engines that read it themselves)."""
        return self._hf.to_str()

    @staticmethod
    def _byte_table(vocab: dict[str, int], added: dict[int, dict]) -> list[bytes]:
        """Bytes of every id of a byte-level vocabulary, as the library's decoder renders them."""
        alphabet = _byte_level_alphabet()
        table = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if i in added and added[i].get("special"):
                # decode() skips special tokens
                continue
            if all(c in alphabet for c in token):
                table[i] = bytes(alphabet[c] for c in token)
            else:
                table[i] = token.encode("utf-8")
        return table

    def encode(self, text: str) -> list[int]:
        if not text.isascii():
            text = utf8_text(text)
        return self._hf.encode(text).ids

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            self.check_ids([token])
        if self._bytes is not None:
            return self._bytes[token]
        return self._hf.decode([token]).encode("utf-8")

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        ids = self.check_ids(tokens)
        if self._bytes is not None:
            table = self._bytes
            return b"".join([table[t] for t in ids])
        return self._hf.decode(ids).encode("utf-8")

    def decode(self, tokens: Iterable[int]) -> str:
        ids = self.check_ids(tokens)
        if self._bytes is not None:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._hf.decode(ids)

    def stream(self) -> StreamDecoder:
        return super().stream() if self._bytes is not None else TextStreamDecoder(self)


@lru_cache(maxsize=1)
def neox_20b() -> HFTokenizer:
    """The 20B tokenizer of RWKV-4 Pile and Raven models, shipped inside the package."""
    try:
        with open(NEOX_20B_FILE, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ModelFormatError(f"{NEOX_20B_FILE}: cannot read the 20B tokenizer ({e.strerror}); "
                               f"reinstall rwkvcpu") from None
    return HFTokenizer(text, name="neox-20b")
