"""Reader of llama.cpp GGUF files of RWKV-6 (`rwkv6`) and RWKV-7 (`rwkv7`), under official names.

Parsing and dequantization are the `gguf` package's (llama.cpp's own Python
reader; the `rwkvcpu[gguf]` extra). llama.cpp's `convert_hf_to_gguf.py`
changes a checkpoint on its way in; this reader undoes each change, so the
source presents BlinkDL's official keys, shapes and values and quant/canonical.py's
official rules apply as for a .pth (docs/FORMAT.md, "llama.cpp GGUF"):

| llama.cpp stores | official |
| --- | --- |
| `token_embd`, `token_embd_norm`, `output_norm`, `output` | `emb`, `blocks.0.ln0`, `ln_out`, `head` |
| `blk.N.attn_norm`, `attn_norm_2`, `time_mix_ln` | `ln1`, `ln2`, `att.ln_x` |
| v6 `time_mix_lerp_fused` (5, 1, 1, D) | `time_maa_w, _k, _v, _r, _g` (rows in that order; older files: `time_mix_lerp_w` ...) |
| v6 `time_mix_w1`, `time_mix_decay_w1`, `time_mix_decay_w2` | transposed back |
| v6 `time_mix_w2` (5, D, E) | (5, E, D) |
| v6 `time_mix_output`, `channel_mix_value` of layer N, divided by 2^(N // rescale_every_n_layers) | multiplied back |
| v6 `time_mix_first` | `time_faaaa` (H, S) |
| v7 `time_mix_lerp_fused` (6, 1, 1, D) | `x_r, x_w, x_k, x_v, x_a, x_g` |
| v7 `time_mix_{w,a,v,g}1`, `..2` (out, in) | official (in, out): transposed back |
| v7 `time_mix_r_k` flattened | (H, S) |
| v7 layer 0's `time_mix_v0/v1/v2` (copies of `a0/a1/a2`, unused) | dropped |

The head size comes from `{arch}.wkv.head_size`; the ln_x epsilon is
llama.cpp's (its graph hard-codes 64e-5 for both generations); the layer norms'
epsilon in the metadata must be rwkvcpu's 1e-5. The vocabulary in the metadata
(`tokenizer.ggml.model = "rwkv"`) is checked token for token against the World
vocabulary (see `tokenizer_name`). Tensor types F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are dequantized to float32 on load.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from rwkvcpu.config import LAYER_NORM_EPS
from rwkvcpu.errors import ConversionError, ModelFormatError, UnsupportedModelError

from .base import OFFICIAL, MappedSource, TensorInfo

MAGIC = b"GGUF"
ARCHITECTURES = {"rwkv6": "v6", "rwkv7": "v7"}
# GGUF architectures built on RWKV that rwkvcpu does not run, with what they are.
FOREIGN_RWKV = {
    "arwkv7": "ARWKV-7 (RWKV-7 time mixing inside a Qwen transformer)",
    "rwkv6qwen2": "RWKV6-Qwen2 (RWKV-6 time mixing inside a Qwen2 transformer, QRWKV)",
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's group norm (rwkv6-base.cpp, rwkv7-base.cpp: ggml_norm(..., 64e-5f)).
GROUP_NORM_EPS = 64e-5
# Longest metadata array read (a vocabulary of a few hundred thousand tokens is the largest in use);
# the gguf reader makes one numpy object per element, so a lying count must be refused first.
MAX_ARRAY = 1 << 24
# Rows dequantized at once: bounds the temporaries of the gguf package's vectorized dequantizers.
CHUNK_BYTES = 16 << 20


def is_gguf(head: bytes) -> bool:
    return head[:4] == MAGIC


class _Short(Exception):
    """A read the file is too short for (the gguf reader would return fewer bytes and go on)."""

    def __init__(self, end):
        self.end = end


def _strict_reader_class():
    """gguf.GGUFReader, made to fail on reads past the end of the file and on absurd array lengths.

    The stock reader slices its memory map without checking, so a count or a length
    that points past the end yields empty arrays and it loops on; an array length of
    billions makes billions of numpy objects. Both are refused here before they happen.
    """
    from gguf import GGUFReader, GGUFValueType

    class StrictReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            # The stock _get, on a plain ndarray view of the map (numpy's memmap subclass
            # costs microseconds per slice; a 65536-token vocabulary takes 200,000 slices)
            # and refusing reads past the end.
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dtype = np.dtype(dtype)
            count = int(count)
            end = int(offset) + dtype.itemsize * count
            if offset < 0 or count < 0 or end > plain.shape[0]:
                raise _Short(end)
            order = self.byte_order if override_order is None else override_order
            return plain[offset:end].view(dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == GGUFValueType.ARRAY:
                n = int(self._get(orig_offs + 4, np.uint64)[0])
                if n > MAX_ARRAY:
                    raise ValueError(f"a metadata array claims {n} elements (more than {MAX_ARRAY})")
                item = int(self._get(orig_offs, np.uint32)[0])
                if item == GGUFValueType.STRING:
                    return self._string_array(orig_offs, n)
                if item in self.gguf_scalar_to_np:
                    return self._scalar_array(orig_offs, n, item)
            return super()._get_field_parts(orig_offs, raw_type)

        def _scalar_array(self, orig_offs, n, item):
            # As the stock reader makes it (one 1-element view per element), in one slice.
            values = self._get(orig_offs + 12, self.gguf_scalar_to_np[GGUFValueType(item)], n)
            parts = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
            parts += [values[i:i + 1] for i in range(n)]
            return 12 + int(values.nbytes), parts, list(range(2, n + 2)), [GGUFValueType.ARRAY, GGUFValueType(item)]

        def _string_array(self, orig_offs, n):
            # The stock reader's parts for an array of strings ([type, count, then length and
            # bytes of each string], data at the bytes), built without its per-element
            # recursion: ten times faster on a vocabulary.
            plain = self._plain
            size = plain.shape[0]
            parts = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
            idxs = []
            offs = orig_offs + 12
            for _ in range(n):
                if offs + 8 > size:
                    raise _Short(offs + 8)
                length = self._get(offs, np.uint64)
                end = offs + 8 + int(length[0])
                if end > size:
                    raise _Short(end)
                parts.append(length)
                parts.append(plain[offs + 8:end])
                idxs.append(len(parts) - 1)
                offs = end
            return offs - orig_offs, parts, idxs, [GGUFValueType.ARRAY, GGUFValueType.STRING]

    return StrictReader


def _parse(path, mapped):
    """(metadata, [(name, type, numpy shape, data offset)]) of a GGUF file, by the gguf package.

    The package maps the file object `mapped` (a base.MappedFile) already opened and checked,
    rather than opening the path a second time.

    Raises:
        ModelFormatError: one line for a file the package cannot read, or the package is missing.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelFormatError(
            f"{path}: is a GGUF file; reading it needs the gguf package: pip install 'rwkvcpu[gguf]'") from None
    try:
        # The reader adds and multiplies the file's uint64 counts as numpy scalars, which warn
        # when a lying value overflows; offsets and sizes are recomputed below in Python integers.
        with np.errstate(all="ignore"):
            # np.memmap, which the reader calls on its argument, takes an open file as well as a path.
            reader = _strict_reader_class()(mapped._f)
        if reader.byte_order != "I":
            raise ModelFormatError(f"{path}: is a big-endian GGUF file, which rwkvcpu does not read")
        fields = {name: _value(f) for name, f in reader.fields.items()}
        # name, type, numpy shape, data offset in the file (the info's offset is from the data section)
        tensors = [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                    int(reader.data_offset) + int(t.field.parts[-1][0])) for t in reader.tensors]
    except _Short as e:
        raise ModelFormatError(
            f"{path}: truncated GGUF file (needs bytes up to {e.end}, file has {mapped.size})") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: unreadable GGUF file ({str(e)[:160]})") from None
    return fields, tensors


def _value(field):
    """A metadata field's value: str, int, float, bool, or a list of them."""
    from gguf import GGUFValueType

    main = field.types[0] if field.types else None
    if main == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING:
        # Token texts are kept as bytes: the vocabulary check compares bytes, and a
        # file's strings need not be valid UTF-8.
        return [bytes(field.parts[i]) for i in field.data]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", "replace")
    return field.contents()


# ---------------------------------------------------------------- names and transforms

# GGUF per-layer name -> official per-layer name, for tensors taken as they are.
_COMMON = {
    "attn_norm.weight": "ln1.weight", "attn_norm.bias": "ln1.bias",
    "attn_norm_2.weight": "ln2.weight", "attn_norm_2.bias": "ln2.bias",
    "time_mix_ln.weight": "att.ln_x.weight", "time_mix_ln.bias": "att.ln_x.bias",
    "time_mix_key.weight": "att.key.weight", "time_mix_value.weight": "att.value.weight",
    "time_mix_receptance.weight": "att.receptance.weight", "time_mix_output.weight": "att.output.weight",
    "channel_mix_key.weight": "ffn.key.weight", "channel_mix_value.weight": "ffn.value.weight",
}
_V6 = dict(_COMMON, **{
    "time_mix_gate.weight": "att.gate.weight",
    "time_mix_lerp_x.weight": "att.time_maa_x",
    "time_mix_decay.weight": "att.time_decay",
    "channel_mix_lerp_k.weight": "ffn.time_maa_k", "channel_mix_lerp_r.weight": "ffn.time_maa_r",
    "channel_mix_receptance.weight": "ffn.receptance.weight",
})
_V7 = dict(_COMMON, **{
    "time_mix_w0.weight": "att.w0", "time_mix_a0.weight": "att.a0", "time_mix_v0.weight": "att.v0",
    "time_mix_k_k.weight": "att.k_k", "time_mix_k_a.weight": "att.k_a",
    "channel_mix_lerp_k.weight": "ffn.x_k",
})
_GLOBAL = {"token_embd.weight": "emb.weight", "token_embd_norm.weight": "blocks.0.ln0.weight",
           "token_embd_norm.bias": "blocks.0.ln0.bias", "output_norm.weight": "ln_out.weight",
           "output_norm.bias": "ln_out.bias", "output.weight": "head.weight"}
# Token-shift coefficients fused into one (rows, 1, 1, D) tensor, in row order.
_LERPS = {"v6": ("time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"),
          "v7": ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")}
_LOW_RANK = {"v6": {"time_mix_w1.weight": "att.time_maa_w1", "time_mix_decay_w1.weight": "att.time_decay_w1",
                    "time_mix_decay_w2.weight": "att.time_decay_w2"},
             "v7": {f"time_mix_{c}{n}.weight": f"att.{c}{n}" for c in "wavg" for n in "12"}}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class _Piece:
    """How one official tensor is made from a GGUF tensor."""

    def __init__(self, gguf_name, op="as_is", arg=None):
        self.gguf_name, self.op, self.arg = gguf_name, op, arg


def _official_shape(op, arg, shape, head_size):
    if op == "transpose":
        return tuple(reversed(shape))
    if op == "swap_last2":
        return shape[:-2] + (shape[-1], shape[-2])
    if op == "row":
        return (shape[-1],)
    if op == "heads":
        n = int(np.prod(shape))
        return (n // head_size, head_size)
    return shape


class GgufSource(MappedSource):
    """A llama.cpp GGUF file of an RWKV-6 or RWKV-7 model, under official names.

    Attributes (besides Source's):
        architecture: "rwkv6" or "rwkv7".
        metadata: the GGUF key/values (token arrays as lists of bytes).

    Example:
        >>> with GgufSource("rwkv7-0.1b-Q4_K_M.gguf") as src:
        ...     w = src.load("blocks.0.att.key.weight")     # (768, 768) float32, dequantized
    """

    format = "gguf"
    naming = OFFICIAL

    def _index(self):
        p = self.path
        fields, tensors = _parse(p, self._file)
        self.metadata = fields
        arch = fields.get("general.architecture")
        if arch in FOREIGN_RWKV:
            raise UnsupportedModelError(
                f"{p}: is an {FOREIGN_RWKV[arch]} model (GGUF architecture {arch!r}), which rwkvcpu does not "
                f"run; it reads the plain rwkv6 and rwkv7 architectures")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{p}: GGUF architecture {arch!r} is not RWKV; rwkvcpu reads llama.cpp's rwkv6 and rwkv7 files")
        self.architecture = arch
        family = ARCHITECTURES[arch]
        self._raw = {}
        for name, typ, shape, offset in tensors:
            self._raw[name] = (typ, shape, offset, self._check_tensor(name, typ, shape, offset))
        self._check_layout()
        n_layer, n_embd, head_size = self._dims(family)
        self.head_size = head_size
        self.rescale_every = int(self._meta_int("rescale_every_n_layers", 0, minimum=0)) if family == "v6" else 0
        eps = fields.get(f"{arch}.attention.layer_norm_epsilon")
        if eps is not None and not abs(float(eps) - LAYER_NORM_EPS) <= 1e-3 * LAYER_NORM_EPS:
            raise UnsupportedModelError(
                f"{p}: its layer norms use epsilon {float(eps):g} ({arch}.attention.layer_norm_epsilon); "
                f"rwkvcpu's use {LAYER_NORM_EPS:g}")
        self._pieces = self._map(family, n_layer)
        for off, piece in self._pieces.items():
            typ, shape, _, nbytes = self._raw[piece.gguf_name]
            share = len(_LERPS[family]) if piece.op == "row" else 1
            self._infos[off] = TensorInfo(off, _official_shape(piece.op, piece.arg, shape, head_size),
                                          typ, nbytes // share)
        self.details = self._details(fields)

    # ------------------------------------------------------------ checks

    def _check_tensor(self, name, typ, shape, offset) -> int:
        """The tensor's size in bytes, after checking its type, shape and place in the file."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        p = self.path
        if not shape or any(d <= 0 for d in shape) or len(shape) > 4:
            raise ModelFormatError(f"{p}: tensor {name!r} has a bad shape {shape}")
        if typ not in SUPPORTED_TYPES:
            raise ModelFormatError(
                f"{p}: tensor {name!r} is {typ}, which rwkvcpu does not read (it reads "
                f"{', '.join(SUPPORTED_TYPES)}); re-quantize it with llama-quantize to one of those, "
                f"or convert the original checkpoint")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[typ]]
        n = 1
        for d in shape:
            n *= d
        if shape[-1] % block:
            raise ModelFormatError(f"{p}: tensor {name!r} is {typ} but its rows ({shape[-1]}) are not whole blocks")
        nbytes = n // block * type_size
        if offset + nbytes > self._file.size:
            raise ModelFormatError(
                f"{p}: truncated in tensor {name!r} (needs bytes up to {offset + nbytes}, file has {self._file.size})")
        return nbytes

    def _check_layout(self):
        spans = sorted((off, off + nb, name) for name, (_, _, off, nb) in self._raw.items())
        for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ModelFormatError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file (corrupt offsets)")

    def _meta_int(self, key, default=None, minimum=1):
        full = f"{self.architecture}.{key}"
        v = self.metadata.get(full, default)
        if v is None:
            raise ModelFormatError(f"{self.path}: GGUF metadata has no {full}")
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ModelFormatError(f"{self.path}: GGUF metadata {full} = {v!r} is not a valid count")
        return v

    def _dims(self, family):
        p = self.path
        n_layer = self._meta_int("block_count")
        n_embd = self._meta_int("embedding_length")
        head_size = self._meta_int("wkv.head_size")
        layers = {int(m.group(1)) for n in self._raw for m in [_BLOCK.match(n)] if m}
        # (compared without building range(n_layer): the count comes from the file)
        if len(layers) != n_layer or (layers and max(layers) != n_layer - 1):
            raise ModelFormatError(
                f"{p}: GGUF metadata says {n_layer} layers ({self.architecture}.block_count) but the file "
                f"holds blocks {sorted(layers)[:3]}{'...' if len(layers) > 3 else ''}")
        emb = self._raw.get("token_embd.weight")
        if emb is None:
            raise ModelFormatError(f"{p}: tensor token_embd.weight is missing")
        if len(emb[1]) != 2 or emb[1][1] != n_embd:
            raise ModelFormatError(
                f"{p}: token_embd.weight has shape {emb[1]}, but the metadata says width {n_embd}")
        if n_embd % head_size:
            raise ModelFormatError(
                f"{p}: GGUF metadata head size {head_size} ({self.architecture}.wkv.head_size) does not "
                f"divide the width {n_embd}")
        return n_layer, n_embd, head_size

    # ------------------------------------------------------------ the official view

    def _map(self, family, n_layer):
        """official name -> _Piece, checking that the file holds exactly what llama.cpp writes."""
        raw, p = self._raw, self.path
        per_layer = _V6 if family == "v6" else _V7
        pieces, used = {}, set()

        def take(gguf_name, off, op="as_is", arg=None, required=True):
            if gguf_name not in raw:
                if required:
                    raise ModelFormatError(f"{p}: tensor {gguf_name} is missing (an {self.architecture} file needs it)")
                return
            pieces[off] = _Piece(gguf_name, op, arg)
            used.add(gguf_name)

        for g, off in _GLOBAL.items():
            take(g, off)
        for i in range(n_layer):
            b, o = f"blk.{i}.", f"blocks.{i}."
            for g, off in per_layer.items():
                if family == "v7" and i == 0 and g == "time_mix_v0.weight":
                    continue
                take(b + g, o + off)
            for g, off in _LOW_RANK[family].items():
                if family == "v7" and i == 0 and g[len("time_mix_")] == "v":
                    continue
                take(b + g, o + off, "transpose")
            lerps = _LERPS[family]
            if family == "v6" and b + "time_mix_lerp_fused.weight" not in raw:
                # llama.cpp files written before the lerps were fused (2024): one tensor each.
                for name in lerps:
                    take(b + "time_mix_lerp_" + name[-1] + ".weight", o + "att." + name)
            else:
                fused = b + "time_mix_lerp_fused.weight"
                if fused not in raw:
                    raise ModelFormatError(f"{p}: tensor {fused} is missing (an {self.architecture} file needs it)")
                used.add(fused)
                rows = raw[fused][1]
                if int(np.prod(rows)) != len(lerps) * rows[-1]:
                    raise UnsupportedModelError(
                        f"{p}: {fused} has shape {rows}, not {len(lerps)} token-shift rows; "
                        f"a variant without the gate (wkv_has_gate) or other rows is not supported")
                for r, name in enumerate(lerps):
                    pieces[o + "att." + name] = _Piece(fused, "row", r)
            if family == "v6":
                take(b + "time_mix_w2.weight", o + "att.time_maa_w2", "swap_last2")
                take(b + "time_mix_first.weight", o + "att.time_faaaa", "heads")
                if self.rescale_every:
                    k = i // self.rescale_every
                    for g in ("time_mix_output.weight", "channel_mix_value.weight"):
                        pieces[o + per_layer[g]] = _Piece(b + g, "scale", 2.0 ** k)
            else:
                take(b + "time_mix_r_k.weight", o + "att.r_k", "heads")
                if i == 0:
                    # llama.cpp copies layer 0's a0/a1/a2 as a dummy v0/v1/v2, unused.
                    used.update(b + f"time_mix_v{n}.weight" for n in "012")
        extra = [n for n in raw if n not in used]
        if extra:
            shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise UnsupportedModelError(
                f"{p}: holds tensors an {self.architecture} model as llama.cpp writes it does not have "
                f"({shown}); it is a variant rwkvcpu does not run")
        return pieces

    def _details(self, fields):
        counts = {}
        for typ, *_ in self._raw.values():
            counts[typ] = counts.get(typ, 0) + 1
        out = {"GGUF architecture": self.architecture,
               "GGUF version": str(fields.get("GGUF.version"))}
        ftype = fields.get("general.file_type")
        if isinstance(ftype, int):
            from gguf import LlamaFileType
            try:
                out["GGUF file type"] = LlamaFileType(ftype).name.replace("MOSTLY_", "").replace("ALL_", "")
            except ValueError:
                out["GGUF file type"] = str(ftype)
        out["GGUF tensor types"] = ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        if fields.get("general.name"):
            out["GGUF name"] = str(fields["general.name"])
        out["GGUF tokenizer"] = self.tokenizer_summary()
        if self.rescale_every:
            out["llama.cpp rescaling"] = f"every {self.rescale_every} layers (undone)"
        return out

    # ------------------------------------------------------------ tokenizer

    def tokenizer_name(self) -> str:
        """The built-in tokenizer this file's vocabulary is: "world", or a ConversionError saying why none.

        llama.cpp writes the World vocabulary as `tokenizer.ggml.model = "rwkv"` with
        token 0 `<s>`, then each vocabulary entry as `repr(bytes)[2:-1]`, then
        `[PADn]` up to the model's vocabulary size; it is World only when every
        entry matches ours.
        """
        problem = self._world_mismatch()
        if problem:
            raise ConversionError(f"{self.path}: {problem}; pass --tokenizer (world, neox-20b, bytes or a tokenizer.json)")
        return "world"

    def tokenizer_summary(self) -> str:
        model = self.metadata.get("tokenizer.ggml.model")
        tokens = self.metadata.get("tokenizer.ggml.tokens") or []
        problem = self._world_mismatch()
        return f"{model} ({len(tokens)} tokens): " + ("the RWKV World vocabulary" if not problem else problem)

    def _world_mismatch(self):
        model = self.metadata.get("tokenizer.ggml.model")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if model != "rwkv" or not isinstance(tokens, list):
            return f"its tokenizer is {model!r}, not llama.cpp's RWKV World vocabulary ('rwkv')"
        world = _world_escaped()
        n = len(world) + 1
        if len(tokens) < n:
            return f"its rwkv vocabulary has {len(tokens)} tokens, not the World vocabulary's {n}"
        for i, (got, want) in enumerate(zip(tokens[1:n], world), start=1):
            if got != want:
                return (f"its rwkv vocabulary differs from the World vocabulary at token {i} "
                        f"({got[:20]!r} instead of {want[:20]!r})")
        extra = [i for i in range(n, len(tokens)) if tokens[i] != f"[PAD{i}]".encode()]
        if extra:
            return f"its rwkv vocabulary has tokens past the World vocabulary (token {extra[0]} is {tokens[extra[0]][:20]!r})"
        return None

    # ------------------------------------------------------------ data

    def load(self, name):
        self.info(name)
        piece = self._pieces[name]
        x = self._dequantize(piece.gguf_name)
        if piece.op == "transpose":
            return x.T
        if piece.op == "swap_last2":
            return np.swapaxes(x, -1, -2)
        if piece.op == "row":
            return x.reshape(-1, x.shape[-1])[piece.arg]
        if piece.op == "heads":
            return x.reshape(self._infos[name].shape)
        if piece.op == "scale":
            # A power of two: exact in float32.
            x *= np.float32(piece.arg)
        return x

    def _dequantize(self, gguf_name):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        typ, shape, offset, nbytes = self._raw[gguf_name]
        qtype = GGMLQuantizationType[typ]
        raw = self._file.array(np.uint8, offset, nbytes)
        rows = int(np.prod(shape[:-1]))
        raw = raw.reshape(rows, nbytes // rows)
        out = np.empty((rows, shape[-1]), np.float32)
        step = max(1, CHUNK_BYTES // raw.shape[1])
        # A corrupt block (an infinite scale) would make numpy warn on inf * 0; the values
        # come back non-finite instead, which the converter refuses in one line (checks.check_finite).
        with np.errstate(all="ignore"):
            for r0 in range(0, rows, step):
                out[r0:r0 + step] = dequantize(raw[r0:r0 + step], qtype).reshape(-1, shape[-1])
        return out.reshape(shape)

    def stored(self):
        return [TensorInfo(n, shape, typ, nbytes) for n, (typ, shape, _, nbytes) in self._raw.items()]

    def release(self, name):
        _, _, offset, nbytes = self._raw[self._pieces[name].gguf_name]
        self._file.drop(offset, nbytes)

    def group_norm_eps(self, family):
        return GROUP_NORM_EPS


@lru_cache(maxsize=1)
def _world_escaped() -> list:
    """The World vocabulary (ids 1..) as llama.cpp's converter writes each token: repr(bytes)[2:-1]."""
    from rwkvcpu.tokenizers.world import WORLD_VOCAB_FILE, read_vocab

    vocab = read_vocab(WORLD_VOCAB_FILE)
    return [repr(vocab[i])[2:-1].encode("utf-8") for i in range(1, max(vocab) + 1)]
