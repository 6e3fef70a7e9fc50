"""What every tokenizer offers, and the streaming decoders that print text safely.

A model generates one token at a time, and a token may end in the middle of a
multi-byte UTF-8 character (one Chinese character or emoji is often two or
three tokens). A stream decoder holds such bytes back until the character is
complete, so a terminal never shows half a character or a replacement sign
that later turns into the right one.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Optional

from ..errors import InvalidArgumentError


def text_bytes(text: str) -> bytes:
    """The UTF-8 bytes of a text, restoring bytes that were not UTF-8 where the text came from.

    Python carries such bytes of a command line, a file name or a stream read
    with errors="surrogateescape" as the code points U+DC80..U+DCFF; they are
    turned back into the original bytes. Any other lone surrogate is no
    character at all and is refused.

    Example:
        >>> text_bytes("caf\udce9")
        b'caf\xe9'
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            f"the text holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}, "
            "which is not a character: pass text that encodes to UTF-8") from None


def utf8_text(text: str) -> str:
    """The text with its surrogate-escaped bytes decoded (see text_bytes); an InvalidArgumentError
    naming the first byte that is not UTF-8."""
    data = text_bytes(text)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(
            f"the text is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}) and this model's "
            "tokenizer reads only UTF-8: convert it first (e.g. iconv -f latin1 -t utf-8)") from None


class StreamDecoder:
    """Turns tokens, one at a time, into text that is safe to show.

    Example:
        >>> stream = tokenizer.stream()
        >>> for token in tokens:
        ...     print(stream.push(token), end="", flush=True)
        >>> print(stream.flush())
    """

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        raise NotImplementedError

    def flush(self) -> str:
        """End of the stream: return what is left.

        Bytes of a character that never completed are dropped, not shown as
        a replacement sign.
        """
        raise NotImplementedError


class ByteStreamDecoder(StreamDecoder):
    """Stream decoder of tokenizers that know each token's bytes.

    Invalid bytes in the middle of the stream (a model can generate any byte
    sequence) become U+FFFD, exactly as ``decode`` renders them; an incomplete
    character at the end is held, and dropped by ``flush``.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._token_bytes(token))

    def flush(self) -> str:
        # The incremental decoder only ever holds the start of an incomplete
        # character (invalid bytes are replaced as soon as they are seen): drop it.
        self._utf8.reset()
        return ""


class TextStreamDecoder(StreamDecoder):
    """Stream decoder for tokenizers that only decode whole sequences to text.

    Decodes a short window of recent tokens twice (without and with the new
    ones) and emits the difference once it no longer ends in U+FFFD. Keeping a
    little context in the window lets decoders that strip a leading space (such
    as sentencepiece's) render word boundaries correctly.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self._decode = tokenizer.decode
        self._tokens: list[int] = []
        self._prefix = 0      # start of the context window
        self._read = 0        # tokens before this index have been emitted

    def push(self, token: int) -> str:
        self._tokens.append(token)
        shown = self._decode(self._tokens[self._prefix:self._read])
        text = self._decode(self._tokens[self._prefix:])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            new = text[len(shown):]
            self._prefix, self._read = self._read, len(self._tokens)
            return new
        return ""

    def flush(self) -> str:
        shown = self._decode(self._tokens[self._prefix:self._read])
        text = self._decode(self._tokens[self._prefix:]).rstrip("\ufffd")
        self._tokens, self._prefix, self._read = [], 0, 0
        return text[len(shown):] if len(text) > len(shown) else ""


class Tokenizer:
    """Text to token ids and back. Subclasses define encode and token_bytes.

    Attributes:
        name: the metadata name ("world", "neox-20b", "bytes", "embedded").
        vocab_size: one more than the largest id this tokenizer produces or decodes.
        eos_token_id: the end-of-text token, or None when the vocabulary has none.
    """

    name: str = "?"
    vocab_size: int = 0
    eos_token_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        """Token ids of a text.

        Example:
            >>> tokenizer.encode("Hello")
            [33155]
        """
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (b"" for control tokens such as end-of-text)."""
        raise NotImplementedError

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        """The bytes a sequence of tokens stands for; no UTF-8 check."""
        return b"".join(self.token_bytes(t) for t in tokens)

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of a sequence of tokens; invalid UTF-8 becomes U+FFFD.

        Example:
            >>> tokenizer.decode(tokenizer.encode("naïve 日本"))
            'naïve 日本'
        """
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        """A fresh incremental decoder (see StreamDecoder)."""
        return ByteStreamDecoder(self)

    def check_ids(self, tokens: Iterable[int], what: str = "token id") -> list[int]:
        """The ids as a list of ints, or InvalidArgumentError naming the first bad one."""
        out = []
        for t in tokens:
            try:
                i = int(t)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"{what} must be an integer, got {t!r}") from None
            if not 0 <= i < self.vocab_size:
                raise InvalidArgumentError(
                    f"{what} {i} is outside this vocabulary (0 .. {self.vocab_size - 1})")
            out.append(i)
        return out

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}, {self.vocab_size} tokens, eos={self.eos_token_id}>"
