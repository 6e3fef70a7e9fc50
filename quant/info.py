"""What a model file is: generation, dimensions, parameters, dtypes, size, metadata.

Works on rwkvcpu files and on every checkpoint the converter reads, by
reading only indexes and headers (no tensor data), so it is quick on large
files.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from rwkvcpu import io
from rwkvcpu.config import FORMAT_NAME, ModelConfig
from rwkvcpu.errors import ConversionError, RwkvCpuError, one_line
from rwkvcpu.layouts import expected_tensors

from . import canonical, lora
from .convert import open_model
from .readers import open_source
from .readers.base import numel
from .readers.safetensors_file import SafetensorsSource
from .readers.statetune import is_state_file


# Metadata keys shown as configuration rows (generation, layers, ...) rather than as they are stored.
CONFIG_KEYS = ("generation", "n_layer", "n_embd", "vocab_size", "dim_ffn", "head_size", "n_head", "lora_dims",
               "group_norm_eps")


def _size_on_disk(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


def _dtype_counts(infos) -> str:
    counts = collections.Counter(i.dtype for i in infos)
    return ", ".join(f"{d} x{n}" for d, n in counts.most_common())


def _config_rows(cfg: ModelConfig) -> dict:
    rows = {
        "generation": cfg.generation,
        "layers": cfg.n_layer,
        "width": cfg.n_embd,
        "vocabulary": cfg.vocab_size,
        "channel-mix width": cfg.dim_ffn,
    }
    if cfg.head_size:
        rows["heads"] = f"{cfg.n_head} of size {cfg.head_size}"
        rows["group-norm epsilon"] = f"{cfg.group_norm_eps:g}"
    if cfg.lora_dims:
        rows["low-rank widths"] = ", ".join(f"{k}={v}" for k, v in sorted(cfg.lora_dims.items()))
    return rows


def _human(n: float, unit="B") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1000.0
    return f"{n} {unit}"


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.2f}{suffix})"
    return f"{n:,}"


# Metadata values longer than this are cut in the listing (an embedded tokenizer is megabytes).
MAX_VALUE_CHARS = 200


def _value(v) -> str:
    """A metadata value as one printable line of at most MAX_VALUE_CHARS characters."""
    text = one_line(str(v))
    if len(text) > MAX_VALUE_CHARS:
        return f"{text[:MAX_VALUE_CHARS]}... ({len(str(v)):,} characters)"
    return text


def describe(path) -> dict:
    """A description of any readable model file or folder, as ordered rows.

    Reads headers and indexes only (no weights), so it is quick on large
    files; the last row says whether the file loads ("loads", rwkvcpu files)
    or converts ("convertible", other checkpoints) and if not, why. Weights
    are checked for NaN and infinities when they are read (load, convert).

    Args:
        path: an rwkvcpu .safetensors file, official .pth, rwkv.cpp .bin,
            llama.cpp .gguf, Hugging Face folder, state-tuning file, or
            RWKV-PEFT adapter (LoRA/PiSSA checkpoint, PiSSA init file).

    Returns:
        dict label -> str, in display order.

    Example:
        >>> describe("tiny-rwkv-5v2-730K-Q5_1.bin")["generation"]
        'v5.2'
    """
    path = Path(path)
    src = open_source(path)
    try:
        meta = getattr(src, "metadata", {}) if isinstance(src, SafetensorsSource) else {}
        if meta.get("format") == FORMAT_NAME:
            return _describe_rwkvcpu(src, meta)
        names = src.tensors()
        if is_state_file(names):
            return _describe_state(src)
        if lora.is_adapter(names):
            return _describe_adapter(src)
    finally:
        src.close()
    source, cfg = open_model(path, tokenizer="?")
    try:
        infos = list(source.tensors().values())
        rows = {"file": str(path), "format": source.format}
        rows.update(_config_rows(cfg))
        n_stored = sum(numel(i.shape) for i in infos)
        rows["parameters"] = _count(n_stored)
        stored = source.stored()
        rows["tensors"] = f"{len(stored)}: {_dtype_counts(stored)}"
        size = _size_on_disk(source.files)
        rows["size on disk"] = f"{size:,} bytes ({_human(size)})"
        if source.group_norm_eps(cfg.family) is not None and cfg.head_size:
            rows["group-norm epsilon"] += " (this source's own)"
        for k, v in source.details.items():
            rows[one_line(str(k))] = _value(v)
        try:
            planned = canonical.plan(source, cfg, "fp32")
            rows["parameters"] = _parameters(source, planned, n_stored)
            rows["convertible"] = "yes"
            source.tokenizer_name()
        except ConversionError as e:
            rows["convertible"] = f"yes, with --tokenizer ({str(e).split(': ', 1)[-1].split('; pass')[0]})"
        except RwkvCpuError as e:
            rows["convertible"] = f"no: {e}"
    finally:
        source.close()
    return rows


def _parameters(source, planned, n_stored: int) -> str:
    """The parameters as the converted file counts them (so both say the same number), and
    what the checkpoint stores besides when that differs."""
    n = sum(numel(p.shape) for p in planned)
    if n == n_stored:
        return _count(n)
    names = source.tensors()
    why = []
    folded = sum(numel(names[k].shape) for k in canonical.CONSUMED if k in names)
    unused = sum(numel(names[k].shape) for k in canonical.UNUSED if k in names)
    if folded:
        why.append(f"{folded:,} of ln0, folded into emb.weight")
    if unused:
        why.append(f"{unused:,} of layer 0's unused v0, v1, v2")
    if n_stored - folded - unused != n:
        why.append("per-head values stored once per channel")
    return f"{_count(n)}, as converted (the checkpoint stores {n_stored:,}: {'; '.join(why)})"


def _describe_rwkvcpu(src, meta) -> dict:
    path = str(src.path)
    rows = {"file": path, "format": f"rwkvcpu {_value(meta.get('format_version', '?'))}"}
    shown_keys = ("format", "format_version", "dtype")
    problem, cfg = None, None
    try:
        cfg = io.check_metadata(meta, path)
    except RwkvCpuError as e:
        problem = str(e)
    if cfg is not None:
        rows.update(_config_rows(cfg))
        shown_keys += CONFIG_KEYS
        try:
            _, arrays = io.open_safetensors(path)
            io.check_tensors(cfg, arrays, path)
            rows["parameters"] = _count(sum(numel(shape) for name, (shape, _kind, optional)
                                            in expected_tensors(cfg).items()
                                            if not optional or name in arrays or name + ".scale" in arrays))
        except RwkvCpuError as e:
            problem = str(e)
    infos = list(src.tensors().values())
    rows["dtype"] = _value(meta.get("dtype", "?"))
    rows["tensors"] = f"{len(infos)}: {_dtype_counts(infos)}"
    size = _size_on_disk([src.path])
    rows["size on disk"] = f"{size:,} bytes ({_human(size)})"
    for k, v in meta.items():
        if k in ("tokenizer_json",):
            rows[k] = f"({len(v):,} characters)"
        elif k not in shown_keys:
            rows[one_line(k)] = _value(v)
    rows["loads"] = "yes" if problem is None else f"no: {problem}"
    return rows


def _describe_state(src) -> dict:
    infos = list(src.tensors().values())
    shape = infos[0].shape
    rows = {"file": str(src.path), "format": f"state-tuning file ({src.format})",
            "layers": len(infos),
            "heads": f"{shape[0]} of size {shape[-1]}" if len(shape) == 3 else json.dumps(list(shape)),
            "tensors": f"{len(infos)}: {_dtype_counts(infos)}",
            "size on disk": f"{_size_on_disk(src.files):,} bytes",
            "use": "rwkvcpu convert MODEL DST --state FILE"}
    return rows


def _describe_adapter(src) -> dict:
    """An RWKV-PEFT adapter: what it adapts (per layer and module), its rank, what it replaces."""
    infos = list(src.tensors().values())
    names = [i.name for i in infos]
    init = lora.is_pissa_init(names)
    pairs = lora.low_rank_pairs(src, lora._INIT if init else lora._LORA)
    modules = collections.Counter(re.sub(r"^blocks\.\d+\.", "", t)[:-len(".weight")] for t in pairs)
    layers = sorted({int(m.group(1)) for t in pairs for m in [re.match(r"^blocks\.(\d+)\.", t)] if m})
    ranks = sorted({src.info(p.a).shape[0] for p in pairs.values()})
    replaced = [n for n in names if not (lora._LORA.match(n) or lora._INIT.match(n))]
    rows = {"file": str(src.path),
            "format": f"RWKV-PEFT {'PiSSA init file' if init else 'LoRA/PiSSA adapter'} ({src.format})",
            "rank": ", ".join(str(r) for r in ranks),
            "adapted weights": f"{len(pairs)}: " + ", ".join(f"{m} x{n}" for m, n in sorted(modules.items())),
            "layers": f"{layers[0]}..{layers[-1]}" if layers else "none"}
    if replaced:
        shown = ", ".join(replaced[:3]) + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else "")
        rows["replaced tensors"] = f"{len(replaced)}: {shown}"
    rows["parameters"] = _count(sum(numel(i.shape) for i in infos))
    rows["tensors"] = f"{len(infos)}: {_dtype_counts(infos)}"
    rows["size on disk"] = f"{_size_on_disk(src.files):,} bytes"
    rows["use"] = ("rwkvcpu convert MODEL DST --lora CHECKPOINT --pissa-init FILE" if init else
                   "rwkvcpu convert MODEL DST --lora FILE --lora-alpha ALPHA (LoRA), or with --pissa-init "
                   "INIT (PiSSA)")
    return rows
