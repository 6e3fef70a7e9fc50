"""Conversion: any supported checkpoint -> rwkvcpu safetensors (docs/FORMAT.md).

Reads like a table of contents: open the source, detect the generation, plan
every output tensor, then stream: load one source tensor, transform it to the
canonical layout, quantize, write, release.

Example:
    >>> from rwkvcpu.quant.convert import convert, read_checkpoint
    >>> convert("RWKV-x070-World-0.1B.pth", "rwkv7-0.1b-int8.safetensors", dtype="int8")
    >>> meta, tensors = read_checkpoint("tiny-rwkv-6v0-1m-Q5_1.bin", dtype="fp32")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from rwkvcpu.config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from rwkvcpu.errors import ConversionError, ModelFormatError

from . import canonical, formats
from .detect import detect
from .readers import open_source
from .readers.statetune import WithState, check_state, is_state_file

TOKENIZER_NAMES = ("world", "neox-20b", "bytes")
# Default tokenizer by vocabulary size. 50304 is the NeoX vocabulary padded to
# a multiple of 64, as in RWKV-7 Pile models.
TOKENIZER_BY_VOCAB = {65536: "world", 50277: "neox-20b", 50304: "neox-20b", 256: "bytes"}
PROGRESS_MIN_BYTES = 100 * 1000 * 1000

QUANT_SCHEMES = {
    "fp32": "fp32: matrices float32",
    "fp16": "fp16: matrices float16",
    "int8": "int8: symmetric, groups of 64 along each row, fp16 scales; "
            "matrices whose input width is not a multiple of 64 are fp16",
    "int4": "int4: asymmetric (scale, min), groups of 32 along each row, fp16 scale and min; "
            "matrices whose input width is not a multiple of 32 are fp16",
}
QUANT_SCHEME_TAIL = "; vectors, low-rank matrices and states float32"


def resolve_tokenizer(tokenizer, vocab_size: int) -> tuple:
    """(name, tokenizer.json text or None) to record in the metadata.

    Args:
        tokenizer: None (pick by vocabulary size), a built-in name, or a path to
            a Hugging Face tokenizer.json to embed.
        vocab_size: the model's vocabulary size.
    """
    if tokenizer is None:
        if vocab_size in TOKENIZER_BY_VOCAB:
            return TOKENIZER_BY_VOCAB[vocab_size], None
        raise ConversionError(
            f"a vocabulary of {vocab_size} tokens matches no built-in tokenizer; pass --tokenizer "
            f"{'|'.join(TOKENIZER_NAMES)} or the path of a tokenizer.json")
    name = str(tokenizer)
    if name in TOKENIZER_NAMES:
        return name, None
    path = Path(name)
    if not path.is_file():
        raise ConversionError(
            f"tokenizer {name!r} is neither {', '.join(TOKENIZER_NAMES)} nor an existing tokenizer.json file")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
        from tokenizers import Tokenizer
        Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same to the user
        raise ConversionError(f"{path}: not a usable Hugging Face tokenizer.json ({str(e)[:120]})") from None
    return "embedded", text


def sha256_of(paths) -> str:
    """SHA-256 of the files' bytes, concatenated in the order given."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while True:
                chunk = f.read(8 * 1024 * 1024)
                if not chunk:
                    break
                h.update(chunk)
    return h.hexdigest()


def open_model(src, *, group_norm_eps=None, tokenizer="world", state=None):
    """Open a checkpoint (plus an optional state-tuning file) and detect it.

    Returns:
        (source, ModelConfig); close the source when done.
    """
    source = open_source(src)
    try:
        meta = getattr(source, "metadata", None) or {}
        if meta.get("format") == FORMAT_NAME:
            raise ModelFormatError(
                f"{source.path}: is already an rwkvcpu model ({meta.get('generation')}, {meta.get('dtype')}); "
                f"convert the original checkpoint to store it differently")
        if is_state_file(source.tensors()):
            raise ModelFormatError(
                f"{source.path}: is a state-tuning file (only time_state); convert the model it was "
                f"tuned from and pass this file with --state")
        config = detect(source, group_norm_eps=group_norm_eps, tokenizer=tokenizer)
        if state is not None:
            st = open_source(state)
            try:
                check_state(st, config)
            except BaseException:
                st.close()
                raise
            source = WithState(source, st)
    except BaseException:
        source.close()
        raise
    return source, config


def _metadata(config: ModelConfig, dtype, source, tok_json, sha) -> dict:
    meta = config.to_metadata()
    meta.update({
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "dtype": dtype,
        "quant_scheme": QUANT_SCHEMES[dtype] + QUANT_SCHEME_TAIL,
        "source_file": source.path.name,
        "source_sha256": sha,
        "source_format": source.format,
    })
    if tok_json is not None:
        meta["tokenizer_json"] = tok_json
    if isinstance(source, WithState):
        meta["state_file"] = source.state.path.name
        meta["state_sha256"] = sha256_of(source.state.files)
    return meta


def _prepare(src, dtype, group_norm_eps, tokenizer, state):
    formats.get_format(dtype)
    source, config = open_model(src, group_norm_eps=group_norm_eps, state=state)
    try:
        tok_name, tok_json = resolve_tokenizer(tokenizer, config.vocab_size)
        config = config.replace(tokenizer=tok_name)
        planned = canonical.plan(source, config, dtype)
    except BaseException:
        source.close()
        raise
    return source, config, planned, tok_json


def _stream(source, config, planned, progress):
    """Yield {full name: array} per canonical tensor, releasing source pages."""
    for p in planned:
        x = canonical.build(source, config, p)
        parts = canonical.store(p, x)
        del x
        yield parts
        source.release(p.source)
        if progress is not None:
            progress(source.info(p.source).nbytes)


def read_checkpoint(path, *, dtype="int8", group_norm_eps=None, tokenizer=None, progress=None, state=None):
    """Read a checkpoint into memory exactly as `convert` would write it.

    Args:
        path: official .pth, rwkv.cpp .bin, .safetensors, or Hugging Face folder.
        dtype: storage of the large matrices: "fp32", "fp16", "int8", "int4".
        group_norm_eps: override of the ln_x epsilon (None: the source's own).
        tokenizer: None (by vocabulary size), "world", "neox-20b", "bytes", or
            a tokenizer.json path to embed.
        progress: optional callable(n_bytes) called as source tensors are done.
        state: optional state-tuning file to merge as att.time_state.

    Returns:
        (metadata: dict[str, str], tensors: dict[str, np.ndarray]) with the
        canonical names (matrix parts suffixed "", ".scale", ".min").

    Example:
        >>> meta, t = read_checkpoint("tiny-rwkv-4v0-660K-FP32.bin", dtype="fp32")
        >>> meta["generation"], t["blocks.0.att.log_decay"].shape
        ('v4', (128,))
    """
    source, config, planned, tok_json = _prepare(path, dtype, group_norm_eps, tokenizer, state)
    try:
        tensors = {}
        for parts in _stream(source, config, planned, progress):
            for name, arr in parts.items():
                # Copy out of the source's memory map, which closes below.
                tensors[name] = np.array(arr, copy=True)
        meta = _metadata(config, dtype, source, tok_json, sha256_of(source.files))
    finally:
        source.close()
    return meta, tensors


def _check_destination(src, dst) -> Path:
    dst = Path(dst)
    if dst.is_dir():
        raise ConversionError(f"{dst}: is a directory; give the output file's name")
    if not dst.parent.exists():
        raise ConversionError(f"{dst}: directory {dst.parent} does not exist")
    if not os.access(dst.parent, os.W_OK):
        raise ConversionError(f"{dst}: directory {dst.parent} is not writable")
    src = Path(src)
    same = src.resolve() == dst.resolve()
    if not same and dst.exists() and src.exists():
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            pass
    if same:
        raise ConversionError(f"{dst}: is the source itself; choose another output file")
    return dst


def convert(src, dst, *, dtype, group_norm_eps=None, tokenizer=None, progress=True, state=None) -> dict:
    """Convert a checkpoint into an rwkvcpu safetensors file, streaming.

    Args:
        src: official .pth, rwkv.cpp .bin, .safetensors, or Hugging Face folder.
        dst: output path; written atomically (temporary file + rename).
        dtype: "fp32", "fp16", "int8" or "int4".
        group_norm_eps: override of the ln_x epsilon (None: the source's own).
        tokenizer: None (by vocabulary size), a built-in name, or a tokenizer.json path.
        progress: True shows a progress bar on stderr for sources over 100 MB;
            a callable(n_bytes) receives progress instead; False/None shows nothing.
        state: optional state-tuning file merged as the initial state.

    Returns:
        the metadata written.

    Example:
        >>> convert("tiny-rwkv-7v0-834K-FP32.bin", "tiny7-int8.safetensors", dtype="int8")["generation"]
        'v7'
    """
    from .writer import SafetensorsWriter

    dst = _check_destination(src, dst)
    source, config, planned, tok_json = _prepare(src, dtype, group_norm_eps, tokenizer, state)
    try:
        sha = sha256_of(source.files)
        meta = _metadata(config, dtype, source, tok_json, sha)
        specs = [(p.name + suffix, st_dtype, shape)
                 for p in planned for suffix, (st_dtype, shape) in p.parts.items()]
        total = sum(source.info(p.source).nbytes for p in planned)
        bar, callback = _progress(progress, total)
        try:
            with SafetensorsWriter(dst, meta, specs) as w:
                for parts in _stream(source, config, planned, callback):
                    for name, arr in parts.items():
                        w.write(name, arr)
                w.commit()
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    finally:
        source.close()
    return meta


def _progress(progress, total):
    if callable(progress):
        return None, progress
    if not progress or total < PROGRESS_MIN_BYTES:
        return None, None
    import sys

    import click
    bar = click.progressbar(length=total, label="converting", file=sys.stderr,
                            show_eta=True, show_percent=True)
    bar.__enter__()
    return bar, bar.update
