"""The World tokenizer against the reference TRIE_TOKENIZER, token for token.

Golden ids (tests/golden/tok_world_parity.json, written by tok_make_golden.py
from the reference) make parity run without torch; the oracle tests compare
live on the same texts, on random ones and on a slice of the dev corpus.
"""

import json
import random

import pytest

from conftest import GOLDEN, requires_oracle
from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.tokenizers import load_tokenizer, world_tokenizer
from rwkvcpu.tokenizers.world import WORLD_VOCAB_FILE, read_vocab

PARITY = json.loads((GOLDEN / "tok_world_parity.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


def test_golden_parity_token_for_token(tok):
    assert len(PARITY["texts"]) >= 100
    for text, ids in zip(PARITY["texts"], PARITY["ids"]):
        assert tok.encode(text) == ids, text[:80]


def test_decode_round_trips_every_golden_text(tok):
    for text, ids in zip(PARITY["texts"], PARITY["ids"]):
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_golden_set_has_tokens_that_split_characters(tok):
    # The set must exercise streaming: tokens that are not valid UTF-8 on their own.
    split = [t for ids in PARITY["ids"] for t in ids if not _valid(tok.token_bytes(t))]
    assert len(split) > 50


def _valid(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_well_known_ids(tok):
    assert tok.encode("Hello world") == [33155, 40213]
    assert tok.encode("\n\n") == [261]
    assert tok.eos_token_id == 0
    assert tok.vocab_size == 65536
    assert tok.token_bytes(0) == b""
    assert tok.decode([0]) == ""
    assert tok.encode("") == []


def test_out_of_range_ids_are_refused(tok):
    for bad in (-1, 65536, 10**9):
        with pytest.raises(InvalidArgumentError, match="outside"):
            tok.decode([1, bad])
    with pytest.raises(InvalidArgumentError):
        tok.token_bytes(-1)


def test_ids_past_the_vocabulary_file_decode_to_nothing(tok):
    # World models have 65536 logits, the file 65529 tokens: the rest is padding.
    assert tok.decode([65535, 33155]) == "Hello"


def test_invalid_utf8_decodes_to_replacement_characters(tok):
    ids = tok.encode_bytes(b"ok \xff\xfe then \xe4\xb8")
    assert tok.decode_bytes(ids) == b"ok \xff\xfe then \xe4\xb8"
    assert tok.decode(ids) == b"ok \xff\xfe then \xe4\xb8".decode("utf-8", "replace")


def test_stream_emits_each_character_as_soon_as_it_is_complete(tok):
    for text, ids in zip(PARITY["texts"][:60], PARITY["ids"][:60]):
        stream = tok.stream()
        shown = ""
        for k, t in enumerate(ids):
            chunk = stream.push(t)
            assert "\ufffd" not in chunk or "\ufffd" in text
            shown += chunk
            # everything decodable so far is shown, nothing more
            so_far = tok.decode_bytes(ids[:k + 1])
            assert shown == _longest_valid_prefix(so_far)
        shown += stream.flush()
        assert shown == text


def _longest_valid_prefix(b):
    for cut in range(len(b), max(len(b) - 4, -1), -1):
        if _valid(b[:cut]):
            return b[:cut].decode("utf-8")
    raise AssertionError("no valid prefix within 4 bytes of the end")


def test_stream_drops_a_character_that_never_completes(tok):
    ids = tok.encode("ok 日")
    stream = tok.stream()
    text = "".join(stream.push(t) for t in ids[:-1] + tok.encode_bytes("日".encode()[:2]))
    assert text == "ok "
    assert stream.flush() == ""


def test_stream_replaces_invalid_bytes_in_the_middle(tok):
    ids = tok.encode_bytes(b"a\xffb")
    stream = tok.stream()
    assert "".join(stream.push(t) for t in ids) + stream.flush() == "a\ufffdb"


def test_vocabulary_file_is_read_exactly():
    vocab = read_vocab(WORLD_VOCAB_FILE)
    assert len(vocab) == 65529
    assert vocab[1] == b"\x00" and vocab[256] == b"\xff" and vocab[261] == b"\n\n"
    assert max(len(v) for v in vocab.values()) == 128


def test_load_tokenizer_picks_world(tok):
    assert load_tokenizer({"tokenizer": "world", "vocab_size": "65536"}) is tok
    assert load_tokenizer({"vocab_size": "65536"}) is tok


@requires_oracle
@pytest.mark.oracle
def test_live_parity_with_the_reference():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    ref = TRIE_TOKENIZER(WORLD_VOCAB_FILE)
    tok = world_tokenizer()
    rng = random.Random(7)
    texts = list(PARITY["texts"])
    # random strings over code points of every UTF-8 length, surrogates excluded
    for _ in range(200):
        cps = [rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xD7FF),
                           rng.randint(0xE000, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
               for _ in range(rng.randint(1, 60))]
        texts.append("".join(map(chr, cps)))
    for text in texts:
        ids = ref.encode(text)
        assert tok.encode(text) == ids, text[:80]
        assert tok.decode_bytes(ids) == ref.decodeBytes(ids)
    for i in range(1, 65530):
        assert tok.token_bytes(i) == ref.idx2token[i]


@requires_oracle
@pytest.mark.oracle
def test_live_parity_on_the_dev_corpus(shared_dir):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    ref = TRIE_TOKENIZER(WORLD_VOCAB_FILE)
    text = (shared_dir / "corpus" / "dev.txt").read_text(encoding="utf-8")[:200_000]
    assert world_tokenizer().encode(text) == ref.encode(text)


def test_text_from_bytes_that_were_not_utf8(tok):
    """Surrogate-escaped bytes (argv, surrogateescape streams) are encoded as the bytes they were;
    a lone surrogate of any other kind is refused, as the reference refuses it."""
    assert tok.encode("caf\udce9 ok") == tok.encode_bytes(b"caf\xe9 ok")
    assert tok.encode("caf\udcc3\udca9") == tok.encode("café")
    with pytest.raises(InvalidArgumentError, match="lone surrogate U\\+D800"):
        tok.encode("x\ud800")
