"""Tokenizers, chosen from a model file's metadata so nobody passes one by hand.

| metadata ``tokenizer`` | tokenizer |
| --- | --- |
| ``world`` | RWKV World, greedy longest match over bytes (``rwkv_vocab_v20230424.txt``, shipped) |
| ``neox-20b`` | the 20B GPT-NeoX / Pile tokenizer of RWKV-4 Pile and Raven (``20B_tokenizer.json``, shipped) |
| ``bytes`` | token id = byte value, for vocabulary-256 models |
| ``embedded`` | the Hugging Face tokenizer.json held whole in the metadata key ``tokenizer_json`` |

An optional metadata key ``eos_token_id`` overrides the end-of-text token the
tokenizer would choose (World: 0; Hugging Face: the special token named
``<|endoftext|>``, ``</s>``, ...; bytes: none).

Example:
    >>> from rwkvcpu.tokenizers import load_tokenizer
    >>> tok = load_tokenizer({"tokenizer": "world", "vocab_size": "65536"})
    >>> tok.encode("Hello world")
    [33155, 40213]
    >>> stream = tok.stream()
    >>> "".join(stream.push(t) for t in tok.encode("日本")) + stream.flush()
    '日本'
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping

from ..errors import ModelFormatError
from .base import ByteStreamDecoder, StreamDecoder, TextStreamDecoder, Tokenizer
from .byte import ByteTokenizer

TOKENIZER_NAMES = ("world", "neox-20b", "bytes", "embedded")


@lru_cache(maxsize=1)
def world_tokenizer():
    """The RWKV World tokenizer, built once per process (about a third of a second)."""
    from .world import WorldTokenizer
    return WorldTokenizer()


def _named(name: str, metadata: Mapping[str, str]) -> Tokenizer:
    if name == "world":
        return world_tokenizer()
    if name == "neox-20b":
        from .hf import neox_20b
        return neox_20b()
    if name == "bytes":
        return ByteTokenizer()
    if name == "embedded":
        text = metadata.get("tokenizer_json")
        if not text:
            raise ModelFormatError("the model file says its tokenizer is embedded, but its metadata "
                                   "has no tokenizer_json; re-convert it with `rwkvcpu convert`")
        from .hf import HFTokenizer
        return HFTokenizer(text, name="embedded")
    raise ModelFormatError(f"unknown tokenizer {name!r} in the model's metadata; "
                           f"expected one of {', '.join(TOKENIZER_NAMES)}")


def load_tokenizer(metadata: Mapping[str, str]) -> Tokenizer:
    """The tokenizer a model file's metadata names.

    Args:
        metadata: the file's str -> str metadata (``Model.metadata``). Keys
            read: ``tokenizer``, ``tokenizer_json``, ``vocab_size``,
            ``eos_token_id``. Without ``tokenizer``, vocabulary-256 models get
            the byte tokenizer and others World.

    Returns:
        a Tokenizer with encode, decode, decode_bytes, stream and eos_token_id.
        World, 20B and byte tokenizers are shared: they hold no mutable state.

    Raises:
        ModelFormatError: unknown tokenizer name, missing or invalid embedded
            tokenizer.json, or a tokenizer with more tokens than the model has logits.
    """
    vocab_size = metadata.get("vocab_size")
    try:
        vocab_size = int(vocab_size) if vocab_size is not None else None
    except ValueError:
        raise ModelFormatError(f"bad vocab_size {vocab_size!r} in the model's metadata") from None
    name = metadata.get("tokenizer") or ("bytes" if vocab_size == 256 else "world")
    tokenizer = _named(name, metadata)
    eos = metadata.get("eos_token_id")
    if eos is not None and eos != "":
        tokenizer = _with_eos(tokenizer, eos)
    problem = vocab_mismatch(tokenizer, vocab_size, f"the {name} tokenizer")
    if problem:
        raise ModelFormatError(f"{problem}; the file's tokenizer metadata is wrong")
    return tokenizer


def vocab_mismatch(tokenizer: Tokenizer, vocab_size, what: str):
    """Why `tokenizer` cannot serve a model of `vocab_size` logits, or None when it can.

    Every id the tokenizer produces must index a logit, so it may have at most
    as many tokens as the model has logits (a model may pad its vocabulary).
    The loader (load_tokenizer) and the converter both apply this one rule.

    Args:
        tokenizer: the tokenizer.
        vocab_size: the model's vocabulary (number of logits); None: unknown, no check.
        what: how the message names the tokenizer ("the world tokenizer").

    Returns:
        None, or a message such as "the world tokenizer has 65536 tokens but the model only 256 logits".

    Example:
        >>> vocab_mismatch(ByteTokenizer(), 256, "the bytes tokenizer") is None
        True
    """
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        return f"{what} has {tokenizer.vocab_size} tokens but the model only {vocab_size} logits"
    return None


def _with_eos(tokenizer: Tokenizer, eos: str) -> Tokenizer:
    import copy
    try:
        eos_id = int(eos)
    except ValueError:
        raise ModelFormatError(f"bad eos_token_id {eos!r} in the model's metadata") from None
    if eos_id < 0:
        eos_id = None
    if eos_id == tokenizer.eos_token_id:
        return tokenizer
    # A shallow copy shares the (read-only) tables of the cached tokenizer.
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_token_id = eos_id
    return tokenizer


__all__ = ["load_tokenizer", "vocab_mismatch", "world_tokenizer", "Tokenizer", "StreamDecoder", "ByteStreamDecoder",
           "TextStreamDecoder", "ByteTokenizer", "TOKENIZER_NAMES"]
