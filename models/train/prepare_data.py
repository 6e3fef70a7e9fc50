"""Prepare the training data of the shipped model: tokenizer and token streams.

Reads the shared Gutenberg corpus (../shared/corpus), trains a byte-level BPE
tokenizer on its training books, and writes, under an ignored folder:

    tokenizer.json          the Hugging Face tokenizer (embedded in the shipped model)
    children.u16, fiction.u16
                            each category's books, tokenized and concatenated, every
                            book followed by token 0 (<|endoftext|>); raw little-endian uint16
    dev.u16                 dev.txt tokenized the same way (books split on blank-line triples)
    data.json               counts and sha256 hashes of the exact text and tokens

Usage:
    python models/train/prepare_data.py --corpus ../shared/corpus --out .device/data --vocab 8192
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
BOOK_SEPARATOR = "\n\n\n"


def read_books(corpus: Path) -> dict:
    """Training books by category: {"children": [str, ...], "fiction": [...]}, manifest order."""
    with lzma.open(corpus / "train.txt.xz", "rb") as f:
        raw = f.read()
    books = {"children": [], "fiction": []}
    for line in open(corpus / "train-manifest.jsonl", encoding="utf-8"):
        row = json.loads(line)
        start, length = row["byte_offset"], row["byte_length"]
        books[row["category"]].append(raw[start:start + length].decode("utf-8"))
    return books


def chunks(texts, size=1 << 16):
    """Pieces of about `size` characters cut at paragraph breaks (BPE training input)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n\n", start + size)
            end = len(text) if end < 0 else end + 2
            yield text[start:end]
            start = end


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],          # id 0, as in RWKV's own vocabularies
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(chunks(texts), trainer)
    return tok


def encode_books(tok: Tokenizer, texts) -> np.ndarray:
    """All books tokenized, each followed by EOS (id 0)."""
    eos = tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(parts)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    ap.add_argument("--out", type=Path, default=Path(".device/data"))
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    books = read_books(args.corpus)
    print(f"read {sum(map(len, books.values()))} books in {time.time() - t0:.0f}s", flush=True)

    t0 = time.time()
    tok = train_tokenizer(books["children"] + books["fiction"], args.vocab)
    tok.save(str(args.out / "tokenizer.json"))
    print(f"trained BPE ({tok.get_vocab_size()} tokens) in {time.time() - t0:.0f}s", flush=True)

    info = {"vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(EOS),
            "tokenizer_sha256": sha256((args.out / "tokenizer.json").read_bytes())}
    dev_text = (args.corpus / "dev.txt").read_text(encoding="utf-8")
    streams = dict(books)
    streams["dev"] = [b for b in dev_text.split(BOOK_SEPARATOR) if b.strip()]
    for name, texts in streams.items():
        t0 = time.time()
        ids = encode_books(tok, texts)
        ids.tofile(args.out / f"{name}.u16")
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        info[name] = {
            "books": len(texts),
            "text_bytes": text_bytes,
            "tokens": int(ids.size),
            "bytes_per_token": round(text_bytes / ids.size, 4),
            # hash of the exact text (books joined by EOS markers) and of the token file
            "text_sha256": sha256(EOS.join(texts).encode("utf-8")),
            "tokens_sha256": sha256(ids.tobytes()),
        }
        print(name, info[name], f"{time.time() - t0:.0f}s", flush=True)
    (args.out / "data.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
