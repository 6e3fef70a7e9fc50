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

import contextlib
import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rwkvcpu.checks import check_finite
from rwkvcpu.config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from rwkvcpu import formats
from rwkvcpu.errors import ConversionError, ModelFormatError
from rwkvcpu.tokenizers import BUILT_IN, TOKENIZER_BY_VOCAB, load_tokenizer, tokenizer_metadata, vocab_mismatch

from . import canonical
from .detect import detect
from .lora import MergedSource, open_adapters
from .readers import open_source
from .readers.statetune import WithState, check_state, is_state_file

PROGRESS_MIN_BYTES = 100 * 1000 * 1000

QUANT_SCHEME_TAIL = "; vectors, low-rank matrices and states float32"


def resolve_tokenizer(tokenizer, vocab_size: int, path="the model", optional: bool = False) -> tuple:
    """(name, tokenizer.json text or None) to record in the metadata.

    The tokenizer is loaded and checked against the vocabulary by the rule the
    engine applies when it loads the file (tokenizers.vocab_mismatch), so a
    file that converts is a file that generates.

    Args:
        tokenizer: None (pick by vocabulary size), a built-in name, or a path to
            a Hugging Face tokenizer.json to embed.
        vocab_size: the model's vocabulary size.
        path: the source, for messages.
        optional: a vocabulary no built-in tokenizer fits, with none given, records "none"
            (a model for token ids only, as rwkvcpu.load makes) instead of raising.
    """
    if tokenizer is None:
        if vocab_size not in TOKENIZER_BY_VOCAB:
            if optional:
                return "none", None
            raise ConversionError(
                f"{path}: a vocabulary of {vocab_size} tokens matches no built-in tokenizer; pass --tokenizer "
                f"{'|'.join(BUILT_IN)} or the path of a tokenizer.json (of at most {vocab_size} tokens)")
        tokenizer = TOKENIZER_BY_VOCAB[vocab_size]
    chosen = tokenizer_metadata(tokenizer, ConversionError)
    name, text = chosen["tokenizer"], chosen.get("tokenizer_json")
    loaded = load_tokenizer({"tokenizer": name, **({"tokenizer_json": text} if text else {})})
    what = f"the tokenizer in {tokenizer}" if text else f"the {name} tokenizer"
    problem = vocab_mismatch(loaded, vocab_size, what)
    if problem:
        fits = TOKENIZER_BY_VOCAB.get(vocab_size)
        hint = (f"pass --tokenizer {fits} (the default for this vocabulary)" if fits else
                f"pass a tokenizer of at most {vocab_size} tokens")
        raise ConversionError(f"{path}: {problem}; {hint}")
    return name, text


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


def open_model(src, *, group_norm_eps=None, tokenizer="world", state=None, lora=(), lora_alpha=(),
               pissa_init=()):
    """Open a checkpoint (plus optional adapters and state-tuning file) and detect it.

    Adapters (quant/lora.py) and the state file are checked against the model
    here, before any tensor data is read.

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
        if lora or pissa_init:
            source = MergedSource(source, open_adapters(source, config, lora, lora_alpha, pissa_init))
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


def check_eos_token_id(eos_token_id, vocab_size: int):
    """The end-of-text id to record (None: the tokenizer's own; -1: none), checked against the vocabulary."""
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
        raise ConversionError(f"the end-of-text token id must be an integer (-1 for none), got {eos_token_id!r}")
    if not -1 <= eos_token_id < vocab_size:
        raise ConversionError(f"end-of-text token id {eos_token_id} is outside the model's vocabulary "
                              f"(0 .. {vocab_size - 1}, or -1 for none)")
    return eos_token_id


def _metadata(config: ModelConfig, dtype, source, tok_json, eos_token_id) -> dict:
    meta = config.to_metadata()
    meta.update({
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "dtype": dtype,
        "quant_scheme": formats.get_format(dtype).scheme + QUANT_SCHEME_TAIL,
        "source_file": source.path.name,
        "source_sha256": sha256_of(source.files),
        "source_format": source.format,
    })
    if tok_json is not None:
        meta["tokenizer_json"] = tok_json
    if eos_token_id is not None:
        meta["eos_token_id"] = str(eos_token_id)
    if isinstance(source, WithState):
        meta["state_file"] = source.state.path.name
        meta["state_sha256"] = sha256_of(source.state.files)
        source = source.model
    if isinstance(source, MergedSource):
        meta["adapters"] = json.dumps([
            {"file": ad.path.name, "sha256": sha256_of(ad.source.files), "kind": ad.kind,
             **({"alpha": float(ad.alpha), "rank": ad.rank} if ad.kind == "lora" else
                {"init_file": ad.init.path.name, "init_sha256": sha256_of(ad.init.files)})}
            for ad in source.adapters])
    return meta


class _Job(NamedTuple):
    """An opened source and everything decided before any tensor is read."""
    source: object       # the reader; the caller closes it
    config: ModelConfig
    planned: list        # canonical.Planned, in output order
    metadata: dict       # str -> str, as written


def _prepare(src, *, dtype, group_norm_eps, tokenizer, state, eos_token_id, lora=(), lora_alpha=(),
             pissa_init=(), tokenizer_optional=False) -> _Job:
    formats.get_format(dtype)
    source, config = open_model(src, group_norm_eps=group_norm_eps, state=state, lora=lora,
                                lora_alpha=lora_alpha, pissa_init=pissa_init)
    try:
        if tokenizer is None:
            # A GGUF file names its vocabulary; other sources leave it to the vocabulary size.
            tokenizer = source.tokenizer_name()
        tok_name, tok_json = resolve_tokenizer(tokenizer, config.vocab_size, source.path, tokenizer_optional)
        eos = check_eos_token_id(eos_token_id, config.vocab_size)
        config = config.replace(tokenizer=tok_name)
        planned = canonical.plan(source, config, dtype)
        return _Job(source, config, planned, _metadata(config, dtype, source, tok_json, eos))
    except BaseException:
        source.close()
        raise


def _stream(job: _Job, progress):
    """Yield {full name: array} per canonical tensor, releasing source pages."""
    source = job.source
    for p in job.planned:
        x = canonical.build(source, job.config, p)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            parts = canonical.store(p, x)
        for name, arr in parts.items():
            # Finite values beyond what the format stores (an fp16 scale past 65504) are said, not written.
            check_finite(arr, source.path, p.source, after=f"quantizing to {p.fmt} (as {name})")
        del x
        yield parts
        source.release(p.source)
        if progress is not None:
            progress(source.info(p.source).nbytes)


def read_checkpoint(path, *, dtype="int8", group_norm_eps=None, tokenizer=None, progress=None, state=None,
                    eos_token_id=None, lora=(), lora_alpha=(), pissa_init=(), tokenizer_optional=False):
    """Read a checkpoint into memory exactly as `convert` would write it.

    Args:
        path: official .pth, rwkv.cpp .bin, .safetensors, or Hugging Face folder.
        dtype: storage of the large matrices: "fp32", "fp16", "int8", "int4".
        group_norm_eps: override of the ln_x epsilon (None: the source's own).
        tokenizer: None (by vocabulary size), "world", "neox-20b", "bytes", or
            a tokenizer.json path to embed.
        progress: optional callable(n_bytes) called as source tensors are done.
        state: optional state-tuning file to merge as att.time_state.
        eos_token_id: end-of-text token to record (-1: none; None: the tokenizer's own).
        lora, lora_alpha, pissa_init: RWKV-PEFT adapters to merge (see convert).
        tokenizer_optional: with no tokenizer given and a vocabulary no built-in
            tokenizer fits, record tokenizer "none" (a model for token ids only,
            as rwkvcpu.load makes it) instead of raising.

    Returns:
        (metadata: dict[str, str], tensors: dict[str, np.ndarray]) with the
        canonical names (matrix parts suffixed "", ".scale", ".min").

    Example:
        >>> meta, t = read_checkpoint("tiny-rwkv-4v0-660K-FP32.bin", dtype="fp32")
        >>> meta["generation"], t["blocks.0.att.log_decay"].shape
        ('v4', (128,))
    """
    job = _prepare(path, dtype=dtype, group_norm_eps=group_norm_eps, tokenizer=tokenizer, state=state,
                   eos_token_id=eos_token_id, lora=lora, lora_alpha=lora_alpha, pissa_init=pissa_init,
                   tokenizer_optional=tokenizer_optional)
    try:
        tensors = {}
        for parts in _stream(job, progress):
            for name, arr in parts.items():
                # Copy out of the source's memory map, which closes below.
                tensors[name] = np.array(arr, copy=True)
    finally:
        job.source.close()
    return job.metadata, tensors


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved, or one inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        # One of them does not exist (yet): then they are not the same file.
        return False


def _inputs(src, state, tokenizer, adapters=()) -> list:
    """Every file the conversion reads, as (what it is, path)."""
    from .readers import input_files

    out = []
    for role, f in input_files(src):
        out.append(("the source itself" if role == "the file" else f"{role} of the source folder {src}", f))
    if state is not None:
        out += [("the state-tuning file (--state)" if role == "the file" else
                 f"{role} of the state-tuning folder {state} (--state)", f) for role, f in input_files(state)]
    if tokenizer is not None and str(tokenizer) not in BUILT_IN:
        out.append(("the tokenizer.json given with --tokenizer", Path(tokenizer)))
    for flag, path in adapters:
        out += [(f"an adapter given with {flag}" if role == "the file" else f"{role} of the adapter folder {path}", f)
                for role, f in input_files(path)]
    return out


def _check_destination(src, dst, state=None, tokenizer=None, adapters=()) -> Path:
    """Refuse a destination that is not a regular file, or is a file the conversion reads.

    Conversion replaces DST only once it has read everything, but a DST that is
    one of its inputs would still lose the user's file, so it is refused before
    anything is read.
    """
    from .writer import check_destination

    dst = check_destination(dst)
    for role, f in _inputs(src, state, tokenizer, adapters):
        if _same_file(f, dst):
            raise ConversionError(f"{dst}: is {role}, which this conversion reads; choose another output file")
    return dst


def convert(src, dst, *, dtype, group_norm_eps=None, tokenizer=None, progress=True, state=None,
            eos_token_id=None, lora=(), lora_alpha=(), pissa_init=()) -> dict:
    """Convert a checkpoint into an rwkvcpu safetensors file, streaming.

    Args:
        src: official .pth, rwkv.cpp .bin, .safetensors, or Hugging Face folder.
        dst: output path; written atomically (temporary file + rename). An
            error, Ctrl-C, SIGTERM or SIGHUP leaves nothing there (see
            terminate_after_cleanup). Refused when it exists and is not a
            regular file (also behind a symbolic link), or when it is one of
            the files read (the source, a folder's weight, index or config
            file, the state file, the tokenizer.json). A symbolic link to a
            regular file is replaced by the new file; its target is kept.
        dtype: "fp32", "fp16", "int8" or "int4".
        group_norm_eps: override of the ln_x epsilon (None: the source's own).
        tokenizer: None (by vocabulary size), a built-in name, or a tokenizer.json path.
        progress: True shows a progress bar on stderr for sources over 100 MB;
            a callable(n_bytes) receives progress instead; False/None shows nothing.
        state: optional state-tuning file merged as the initial state.
        eos_token_id: end-of-text token to record (-1: none; None: the tokenizer's own).
        lora: RWKV-PEFT adapter files (LoRA, or PiSSA with its init file) merged
            in float32 before quantization (quant/lora.py).
        lora_alpha: LoRA's alpha: one value for every LoRA adapter, or one per
            adapter in order (PiSSA adapters take none).
        pissa_init: the init_pissa.pth of each PiSSA adapter.

    Returns:
        the metadata written.

    Example:
        >>> convert("tiny-rwkv-7v0-834K-FP32.bin", "tiny7-int8.safetensors", dtype="int8")["generation"]
        'v7'
    """
    adapters = [("--lora", p) for p in lora] + [("--pissa-init", p) for p in pissa_init]
    dst = _check_destination(src, dst, state, tokenizer, adapters)
    with terminate_after_cleanup():
        job = _prepare(src, dtype=dtype, group_norm_eps=group_norm_eps, tokenizer=tokenizer, state=state,
                       eos_token_id=eos_token_id, lora=lora, lora_alpha=lora_alpha, pissa_init=pissa_init)
        try:
            _write(job, dst, progress)
        finally:
            job.source.close()
    return job.metadata


def _write(job: _Job, dst: Path, progress) -> None:
    from .writer import SafetensorsWriter

    specs = [(p.name + suffix, st_dtype, shape)
             for p in job.planned for suffix, (st_dtype, shape) in p.parts.items()]
    total = sum(job.source.info(p.source).nbytes for p in job.planned)
    bar, callback = _progress(progress, total)
    try:
        with SafetensorsWriter(dst, job.metadata, specs) as w:
            for parts in _stream(job, callback):
                for name, arr in parts.items():
                    w.write(name, arr)
            w.commit()
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


class _Terminated(KeyboardInterrupt):
    """Raised by the temporary SIGTERM/SIGHUP handler: unwinds like Ctrl-C."""


# Signals whose default action kills the process at once, running no clean-up.
_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def terminate_after_cleanup():
    """While the block runs, SIGTERM and SIGHUP unwind it like Ctrl-C, then end the process.

    Their default action kills the process on the spot and would leave the
    temporary output file behind. Here they raise an exception instead, so
    the writer removes its temporary file and the source is closed; then the
    default action is restored and the signal sent again, so the process
    still ends as killed by that signal. Only signals left at their default
    action are taken over, and only in the main thread (the only one that
    may set handlers): a program with handlers of its own keeps them.

    Example:
        >>> with terminate_after_cleanup():
        ...     convert_and_write()
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    running = [True]

    def handler(signum, frame):
        caught.append(signum)
        # the first signal unwinds the block; later ones must not cut its clean-up short
        if len(caught) == 1 and running[0]:
            raise _Terminated

    previous = {sig: signal.signal(sig, handler) for sig in _TERMINATING
                if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    except _Terminated:
        pass
    finally:
        running[0] = False
        for sig, old in previous.items():
            signal.signal(sig, old)
    if caught:
        os.kill(os.getpid(), caught[0])
        # Reached only if the signal is blocked: end as a shell reports a killed process.
        raise SystemExit(128 + caught[0])


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
