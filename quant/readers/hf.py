"""Hugging Face checkpoints: folders of safetensors or pytorch_model.bin shards.

Two RWKV layouts are read and renamed into the official keys, so the official
rules of quant/canonical.py apply:

- transformers' RWKV-4 (`RwkvForCausalLM`): official values under other names
  (`rwkv.blocks.N.attention.time_mix_key` for `blocks.N.att.time_mix_k`, ...).
- fla's RWKV-7 (`RWKV7ForCausalLM`, `model.layers.N.attn.r_proj.weight`, ...):
  nn.Linear low-rank layers, stored (out, in), i.e. the official `w1` etc.
  transposed; `w0`/`a0`/`v0` are the biases of the second LoRA layer.

Any other architecture named by a folder's config.json is refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rwkvcpu.errors import ModelFormatError, UnsupportedModelError, open_input, shown

from .base import OFFICIAL, Source, TensorInfo

RWKV_ARCHITECTURES = ("RwkvForCausalLM", "RWKV7ForCausalLM", "Rwkv5ForCausalLM", "Rwkv6ForCausalLM",
                      "RwkvModel", "RWKV7Model")


class MultiSource(Source):
    """Several files (shards) seen as one set of tensors."""

    def __init__(self, path, parts):
        super().__init__(path)
        self.parts = parts
        self.files = [f for p in parts for f in p.files]
        shared = shared_tensor(parts)
        if shared is not None:
            name, a, b = shared
            raise ModelFormatError(f"{path}: tensor {shown(name)} appears in two shards, {a.path.name} and {b.path.name}")
        self._owner = {}
        for part in parts:
            for name, info in part.tensors().items():
                self._owner[name] = part
                self._infos[name] = info
        self.format = parts[0].format if parts else "?"

    def load(self, name):
        self.info(name)
        return self._owner[name].load(name)

    def release(self, name):
        self._owner[name].release(name)

    def close(self):
        for p in self.parts:
            p.close()


def shared_tensor(parts):
    """(tensor name, first part, second part) of a tensor two parts both hold, or None.

    Shards of one model hold disjoint tensors; files that share one are not shards.
    """
    owner = {}
    for part in parts:
        for name in part.tensors():
            if name in owner:
                return name, owner[name], part
            owner[name] = part
    return None


class RenamedSource(Source):
    """A view of another source under official names (optionally transposed)."""

    naming = OFFICIAL

    def __init__(self, inner, mapping, fmt, ln0_optional=False, group_norm_eps=None):
        super().__init__(inner.path)
        self.inner = inner
        self.files = inner.files
        self.format = fmt
        self.details = dict(inner.details)
        self.ln0_optional = ln0_optional
        self._map = {}
        for off_name, (src_name, transpose) in mapping.items():
            info = inner.info(src_name)
            shape = tuple(reversed(info.shape)) if transpose else info.shape
            self._infos[off_name] = TensorInfo(off_name, shape, info.dtype, info.nbytes)
            self._map[off_name] = (src_name, transpose)
        self._eps = group_norm_eps

    def group_norm_eps(self, family):
        return self._eps

    def load(self, name):
        self.info(name)
        src_name, transpose = self._map[name]
        x = self.inner.load(src_name)
        return x.T if transpose else x

    def release(self, name):
        self.inner.release(self._map[name][0])

    def close(self):
        self.inner.close()


# ---------------------------------------------------------------- transformers RWKV-4

_TRANSFORMERS_RENAMES = (
    (r"^rwkv\.", ""),
    (r"^embeddings\.", "emb."),
    (r"^blocks\.0\.pre_ln\.", "blocks.0.ln0."),
    (r"^(blocks\.\d+)\.attention\.", r"\1.att."),
    (r"^(blocks\.\d+)\.feed_forward\.", r"\1.ffn."),
    (r"\.time_mix_key$", ".time_mix_k"),
    (r"\.time_mix_value$", ".time_mix_v"),
    (r"\.time_mix_receptance$", ".time_mix_r"),
    (r"\.time_mix_gate$", ".time_mix_g"),
)


def transformers_to_official(name: str) -> str:
    for pat, rep in _TRANSFORMERS_RENAMES:
        name = re.sub(pat, rep, name)
    return name


# ---------------------------------------------------------------- fla RWKV-7

_FLA_GLOBAL = {
    "model.embeddings.weight": "emb.weight",
    "model.norm.weight": "ln_out.weight",
    "model.norm.bias": "ln_out.bias",
    "lm_head.weight": "head.weight",
}
_FLA_PART = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2", "attn": "att", "ffn": "ffn"}
_FLA_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
_FLA_LORA = re.compile(r"^([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)$")


def fla_to_official(name: str):
    """(official name, transposed?) of an fla RWKV-7 key; unknown keys pass through."""
    if name in _FLA_GLOBAL:
        return _FLA_GLOBAL[name], False
    m = re.match(r"^model\.layers\.(\d+)\.([a-z_]+)\.(.+)$", name)
    if not m or m.group(2) not in _FLA_PART:
        return name, False
    i, part, rest = m.group(1), _FLA_PART[m.group(2)], m.group(3)
    lora = _FLA_LORA.match(rest)
    if part == "att" and lora:
        typ, which = lora.groups()
        num, transpose = {"0.weight": ("1", True), "2.weight": ("2", True), "2.bias": ("0", False)}[which]
        return f"blocks.{i}.att.{typ}{num}", transpose
    head, _, tail = rest.partition(".")
    if part == "att" and head in _FLA_PROJ:
        rest = _FLA_PROJ[head] + ("." + tail if tail else "")
    return f"blocks.{i}.{part}.{rest}", False


def to_official(source, fla_eps=None):
    """Wrap a raw source so it presents official keys, whatever HF layout it uses.

    Args:
        source: a reader of one file or of a folder's shards.
        fla_eps: the ln_x epsilon an fla config.json implies, if any.
    """
    names = set(source.tensors())
    if "rwkv.embeddings.weight" in names:
        mapping = {transformers_to_official(n): (n, False) for n in names}
        return RenamedSource(source, mapping, "hf-transformers")
    if "model.embeddings.weight" in names and any(".attn.r_proj." in n for n in names):
        mapping = {}
        for n in names:
            off, transpose = fla_to_official(n)
            mapping[off] = (n, transpose)
        return RenamedSource(source, mapping, "hf-fla", ln0_optional=True, group_norm_eps=fla_eps)
    return source


# ---------------------------------------------------------------- folders

# config.json and shard indexes are a few KB; a larger one is not a model folder's.
MAX_JSON_BYTES = 16 * 1024 * 1024


def _read_json(file: Path, what: str):
    """A folder's JSON file, parsed; one-line ModelFormatErrors for anything else."""
    with open_input(file, what, ModelFormatError) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ModelFormatError(f"{file}: a {what} of more than {MAX_JSON_BYTES:,} bytes; not a model folder's")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{file}: unreadable {what} ({shown(str(e))})") from None


def _config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return {}
    cfg = _read_json(cfg_file, "config.json")
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_file}: config.json holds a {type(cfg).__name__}, not an object")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ModelFormatError(f"{cfg_file}: \"architectures\" is {shown(archs)}, not a list of names")
    for key in ("norm_eps", "head_dim"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ModelFormatError(f"{cfg_file}: \"{key}\" is {shown(v)}, not a number")
    return cfg


def _shard_names(index: Path, weight_map) -> list:
    """The file names a shard index lists, each a plain file of the folder."""
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFormatError(f"{index}: unreadable shard index (weight_map must map tensor names to file names)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            # A shard is a file beside the index: never a path reaching elsewhere on the disk.
            raise ModelFormatError(f"{index}: shard {shown(name)} is not a file name in the folder")
    return names


def _weight_files(path: Path) -> tuple:
    """(weight files to read, the shard index naming them or None) of a folder."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            data = _read_json(index, "shard index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            files = [path / f for f in _shard_names(index, weight_map)]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ModelFormatError(f"{missing[0]}: shard listed in {index_name} is missing")
            return files, index
        if (path / single).is_file():
            return [path / single], None
    return sorted(path.glob("*.safetensors")), None


def folder_files(path) -> list:
    """Every file `open_folder` reads, as (what it is, path), without opening any.

    Example:
        >>> folder_files("rwkv7-0.1b-hf")
        [('the config.json', PosixPath('rwkv7-0.1b-hf/config.json')),
         ('a weight file', PosixPath('rwkv7-0.1b-hf/model.safetensors'))]
    """
    path = Path(path)
    out = [("the config.json", path / "config.json")] if (path / "config.json").is_file() else []
    files, index = _weight_files(path)
    if index is not None:
        out.append(("the shard index", index))
    return out + [("a weight file", f) for f in files]


def open_folder(path, open_file) -> Source:
    """Open a Hugging Face model folder.

    Args:
        path: the folder.
        open_file: function opening one weight file as a raw source.

    Returns:
        a source under official names.
    """
    path = Path(path)
    cfg = _config(path)
    archs = cfg.get("architectures") or []
    if archs and not any(a in RWKV_ARCHITECTURES for a in archs):
        raise UnsupportedModelError(
            f"{path}: config.json names {', '.join(archs)}, not RWKV; rwkvcpu converts RWKV v4-v7 only")
    files, index = _weight_files(path)
    if not files:
        raise ModelFormatError(
            f"{path}: folder has no model.safetensors, pytorch_model.bin or *.safetensors to read")
    parts = []
    try:
        for f in files:
            parts.append(open_file(f))
        shared = shared_tensor(parts) if index is None else None
        if shared is not None:
            # No index says these files belong together, and they overlap: several models.
            name, a, b = shared
            raise ModelFormatError(
                f"{path}: holds several *.safetensors files without an index (model.safetensors.index.json) "
                f"that are not shards of one model ({a.path.name} and {b.path.name} both hold {name}); "
                f"give one of them as the source")
        raw = MultiSource(path, parts) if len(parts) > 1 else parts[0]
    except BaseException:
        for p in parts:
            p.close()
        raise
    fla_eps = None
    if cfg.get("norm_eps") is not None:
        # fla's g_norm epsilon is head_dim * norm_eps (64e-5 for head size 64); detect checks it is positive.
        try:
            fla_eps = float(cfg.get("head_dim") or 64) * float(cfg["norm_eps"])
        except OverflowError:
            raise ModelFormatError(f"{path / 'config.json'}: head_dim or norm_eps is out of range") from None
    src = to_official(raw, fla_eps)
    src.path = path
    src.details = dict(src.details, **({"architectures": ", ".join(archs)} if archs else {}))
    return src
