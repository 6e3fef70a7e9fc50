"""Hugging Face tokenizer.json (20B shipped, embedded), the byte tokenizer, and load_tokenizer."""

import json
import random

import pytest

from conftest import GOLDEN
from rwkvcpu.errors import InvalidArgumentError, ModelFormatError
from rwkvcpu.tokenizers import ByteTokenizer, TextStreamDecoder, load_tokenizer
from rwkvcpu.tokenizers.hf import NEOX_20B_FILE, HFTokenizer

PARITY = json.loads((GOLDEN / "tok_world_parity.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer({"tokenizer": "neox-20b", "vocab_size": "50277"})


@pytest.fixture(scope="module")
def library():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(NEOX_20B_FILE)


def test_20b_is_shipped_and_matches_the_library(neox, library):
    assert neox.vocab_size == 50277
    assert neox.eos_token_id == 0       # <|endoftext|>
    for text in PARITY["texts"][:80]:
        ids = library.encode(text).ids
        assert neox.encode(text) == ids
        assert neox.decode(ids) == library.decode(ids)


def test_20b_byte_table_matches_library_decoding_of_random_ids(neox, library):
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(2, 50277) for _ in range(rng.randint(1, 12))]
        assert neox.decode(ids) == library.decode(ids), ids


def test_20b_stream_holds_partial_characters(neox):
    text = "日本語 😀 naïve"
    ids = neox.encode(text)
    assert any(not _valid(neox.token_bytes(t)) for t in ids)
    stream = neox.stream()
    chunks = [stream.push(t) for t in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + stream.flush() == text


def _valid(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _wordpiece_json():
    """A tiny non-byte-level tokenizer (Metaspace / sentencepiece style) built with the library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "</s>": 1, "▁hello": 2, "▁world": 3, "▁": 4, "h": 5, "i": 6, "▁hi": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["</s>"])
    return tok.to_str()


def test_embedded_tokenizer_from_metadata():
    meta = {"tokenizer": "embedded", "tokenizer_json": _wordpiece_json(), "vocab_size": "8"}
    tok = load_tokenizer(meta)
    assert tok.name == "embedded"
    assert tok.eos_token_id == 1       # the special token named </s>
    ids = tok.encode("hello world")
    assert ids == [2, 3]
    assert tok.decode(ids) == "hello world"
    # no byte table: streaming decodes a window and keeps the word boundary
    stream = tok.stream()
    assert isinstance(stream, TextStreamDecoder)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == "hello world"


def test_embedded_tokenizer_errors():
    with pytest.raises(ModelFormatError, match="tokenizer_json"):
        load_tokenizer({"tokenizer": "embedded"})
    with pytest.raises(ModelFormatError, match="not a valid tokenizer.json"):
        load_tokenizer({"tokenizer": "embedded", "tokenizer_json": "{not json"})


def test_unknown_tokenizer_name():
    with pytest.raises(ModelFormatError, match="unknown tokenizer 'gpt2'"):
        load_tokenizer({"tokenizer": "gpt2"})


def test_tokenizer_bigger_than_the_model_is_refused():
    with pytest.raises(ModelFormatError, match="65536 tokens but the model only 256"):
        load_tokenizer({"tokenizer": "world", "vocab_size": "256"})


def test_eos_override_from_metadata():
    tok = load_tokenizer({"tokenizer": "bytes", "vocab_size": "256", "eos_token_id": "10"})
    assert tok.eos_token_id == 10
    assert load_tokenizer({"tokenizer": "bytes", "vocab_size": "256"}).eos_token_id is None
    world = load_tokenizer({"tokenizer": "world", "eos_token_id": "-1"})
    assert world.eos_token_id is None
    assert load_tokenizer({"tokenizer": "world"}).eos_token_id == 0   # the shared one is untouched


def test_byte_tokenizer():
    tok = load_tokenizer({"vocab_size": "256"})
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 195, 169]) == "hé"
    assert tok.decode_bytes([0, 255]) == b"\x00\xff"
    stream = tok.stream()
    assert [stream.push(t) for t in [104, 195, 169]] == ["h", "", "é"]
    with pytest.raises(InvalidArgumentError):
        tok.decode([256])


def test_text_stream_decoder_holds_incomplete_text():
    # a decoder that only knows whole sequences: a lone lead byte decodes to U+FFFD
    class Fake:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", "replace")
    stream = TextStreamDecoder(Fake())
    out = [stream.push(b) for b in "a日b".encode()]
    assert out == ["a", "", "", "日", "b"]
    assert stream.push(0xE6) == ""
    assert stream.flush() == ""


def test_tokenizer_files_ship_inside_the_package():
    from importlib.resources import files
    here = files("rwkvcpu.tokenizers")
    assert (here / "rwkv_vocab_v20230424.txt").is_file()
    assert (here / "20B_tokenizer.json").is_file()


def test_text_from_bytes_that_were_not_utf8(neox):
    """Python keeps such bytes (from argv, a file name, a surrogateescape stream) as U+DC80..U+DCFF."""
    escaped_valid = b"caf\xc3\xa9".decode("utf-8", "surrogateescape").encode("utf-8").decode("utf-8")
    assert neox.encode("caf\udcc3\udca9") == neox.encode("café") == neox.encode(escaped_valid)
    with pytest.raises(InvalidArgumentError, match=r"not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        neox.encode("caf\udce9 au lait")
    with pytest.raises(InvalidArgumentError, match="lone surrogate U\\+D800 at character 1"):
        neox.encode("a\ud800b")
    bytes_model = ByteTokenizer()
    assert bytes_model.encode("caf\udce9") == [99, 97, 102, 0xE9]
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        bytes_model.encode("\udfff")
