"""Tokenizers, chosen from a model file's metadata so nobody passes one by hand.

| metadata ``tokenizer`` | tokenizer |
| --- | --- |
| ``world`` | RWKV World, greedy longest match over bytes (``rwkv_vocab_v20230424.txt``, shipped) |
| ``neox-20b`` | the 20B GPT-NeoX / Pile tokenizer of RWKV-4 Pile and Raven (``20B_tokenizer.json``, shipped) |
| ``bytes`` | token id = byte value, for vocabulary-256 models |
| ``embedded`` | the Hugging Face tokenizer.json held whole in the metadata key ``tokenizer_json`` |
| ``none`` | no tokenizer: a model loaded without one (token ids only; `load(..., tokenizer=)` gives one) |

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

from pathlib import Path

from ..errors import InvalidArgumentError, ModelFormatError, shown
from .base import ByteStreamDecoder, StreamDecoder, TextStreamDecoder, Tokenizer
from .byte import ByteTokenizer

# The tokenizers that ship with rwkvcpu, by the names users give them.
BUILT_IN = ("world", "neox-20b", "bytes")
TOKENIZER_NAMES = BUILT_IN + ("embedded", "none")
# The built-in tokenizer a vocabulary size implies. 50304 is the NeoX vocabulary
# padded to a multiple of 64, as in RWKV-7 Pile models.
TOKENIZER_BY_VOCAB = {65536: "world", 50277: "neox-20b", 50304: "neox-20b", 256: "bytes"}


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
    if name == "none":
        raise InvalidArgumentError(
            f"this model has no tokenizer (its vocabulary of {metadata.get('vocab_size', '?')} tokens matches no "
            f"built-in one), so it takes and gives token ids only; for text, load it with rwkvcpu.load(path, "
            f"tokenizer=NAME) ({', '.join(BUILT_IN)} or a tokenizer.json path), or convert it with "
            f"`rwkvcpu convert --tokenizer`")
    if name == "embedded":
        text = metadata.get("tokenizer_json")
        if not text:
            raise ModelFormatError("the model file says its tokenizer is embedded, but its metadata "
                                   "has no tokenizer_json; re-convert it with `rwkvcpu convert`")
        from .hf import HFTokenizer
        return HFTokenizer(text, name="embedded")
    raise ModelFormatError(f"unknown tokenizer {shown(name)} in the model's metadata; "
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
        InvalidArgumentError: the model was loaded without a tokenizer ("none").
    """
    vocab_size = metadata.get("vocab_size")
    try:
        vocab_size = int(vocab_size) if vocab_size is not None else None
    except ValueError:
        raise ModelFormatError(f"bad vocab_size {shown(vocab_size)} in the model's metadata") from None
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


def tokenizer_metadata(tokenizer, error: type = InvalidArgumentError) -> dict:
    """The metadata keys that name a tokenizer given by a user (`rwkvcpu.load(tokenizer=)`,
    `rwkvcpu convert --tokenizer`).

    Args:
        tokenizer: a built-in name (world, neox-20b, bytes) or the path of a Hugging Face
            tokenizer.json, which is embedded whole.
        error: the RwkvCpuError subclass to raise.

    Returns:
        {"tokenizer": name} or {"tokenizer": "embedded", "tokenizer_json": text}.

    Raises:
        error: neither a built-in name nor a readable, valid tokenizer.json.

    Example:
        >>> tokenizer_metadata("bytes")
        {'tokenizer': 'bytes'}
    """
    if str(tokenizer) in BUILT_IN:
        return {"tokenizer": str(tokenizer)}
    path = Path(tokenizer)
    if not path.is_file():
        raise error(f"tokenizer {str(path)!r} is neither {', '.join(BUILT_IN)} nor an existing tokenizer.json file")
    try:
        text = path.read_text(encoding="utf-8")
        from tokenizers import Tokenizer as HFTokenizer
        HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - any read or parse failure means the same to the user
        raise error(f"{path}: not a usable Hugging Face tokenizer.json ({str(e)[:120]})") from None
    return {"tokenizer": "embedded", "tokenizer_json": text}


def _with_eos(tokenizer: Tokenizer, eos: str) -> Tokenizer:
    import copy
    try:
        eos_id = int(eos)
    except ValueError:
        raise ModelFormatError(f"bad eos_token_id {shown(eos)} in the model's metadata") from None
    if eos_id < 0:
        eos_id = None
    if eos_id == tokenizer.eos_token_id:
        return tokenizer
    # A shallow copy shares the (read-only) tables of the cached tokenizer.
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_token_id = eos_id
    return tokenizer


__all__ = ["load_tokenizer", "vocab_mismatch", "tokenizer_metadata", "world_tokenizer", "Tokenizer", "StreamDecoder",
           "ByteStreamDecoder", "TextStreamDecoder", "ByteTokenizer", "TOKENIZER_NAMES", "BUILT_IN",
           "TOKENIZER_BY_VOCAB"]
