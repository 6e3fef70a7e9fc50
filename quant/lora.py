"""LoRA and PiSSA adapters from RWKV-PEFT, merged into a model at conversion.

RWKV-PEFT saves what a fine-tune trained, under official keys (merge/merge.py,
merge_lora.py and merge_pissa.py are the formulas followed here):

- `X.lora_A` (r, in) and `X.lora_B` (out, r) for a linear layer whose weight is
  `X.weight` (out, in). LoRA merges as `W + (alpha / r) B A`, with the
  `lora_alpha` of the training run (not stored in the file). PiSSA merges as
  `W - B0 A0 + B A`, unscaled, where `X.init_lora_A` / `X.init_lora_B` (A0, B0)
  come from the run's `init_pissa.pth`.
- any other tensor (the `train_parts`, by default the `time*` and `ln*`
  parameters) replaces the model's tensor of that name.

Every adapter tensor is checked against the model (names, shapes) before any
data is read; the merge runs in float64 per tensor, rounded once to float32, as
the source tensor is loaded, so quantization to the chosen dtype happens after.

Example:
    >>> from rwkvcpu.quant.convert import convert
    >>> convert("RWKV-x070-World-0.4B.pth", "tuned-int8.safetensors", dtype="int8",
    ...         lora=["rwkv-0.pth"], lora_alpha=[32])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from rwkvcpu.errors import ConversionError

from .readers.base import OFFICIAL, RWKV_CPP, Source

_LORA = re.compile(r"^(.+)\.(lora_A|lora_B)$")
_INIT = re.compile(r"^(.+)\.(init_lora_A|init_lora_B)$")
# Other RWKV-PEFT methods, whose merges are not these formulas.
_OTHER_PEFT = re.compile(r"\.(bone|disha|bat)(\.|$)")


def is_adapter(names) -> bool:
    """Whether a file's tensor names are an RWKV-PEFT LoRA/PiSSA checkpoint or PiSSA init file."""
    return any(_LORA.match(n) or _INIT.match(n) for n in names)


def is_pissa_init(names) -> bool:
    names = list(names)
    return bool(names) and all(_INIT.match(n) for n in names)


class Pair(NamedTuple):
    target: str          # the model's weight, e.g. blocks.0.att.key.weight
    a: str               # key of A (r, in)
    b: str               # key of B (out, r)


def low_rank_pairs(source: Source, pattern=_LORA) -> dict:
    """target weight -> Pair, for every A/B pair of an adapter; a lone A or B is refused."""
    halves = {}
    for n in source.tensors():
        m = pattern.match(n)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)[-1]] = n
    pairs = {}
    for prefix, ab in halves.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))
            raise ConversionError(f"{source.path}: holds {have} without its {'B' if 'A' in ab else 'A'} half")
        pairs[prefix + ".weight"] = Pair(prefix + ".weight", ab["A"], ab["B"])
    return pairs


class Adapter:
    """One adapter file, opened and checked against a model.

    Attributes:
        path: the file.
        kind: "lora" or "pissa".
        scale: alpha / r for LoRA, 1 for PiSSA.
        pairs: target weight -> Pair (keys in `source`).
        init_pairs: target weight -> Pair (keys in `init`), PiSSA only.
        replaced: names of the model tensors the adapter replaces.
    """

    def __init__(self, source: Source, init: Optional[Source], alpha: Optional[float]):
        self.source, self.init, self.path = source, init, source.path
        self.kind = "pissa" if init is not None else "lora"
        self.pairs = low_rank_pairs(source)
        self.init_pairs = low_rank_pairs(init, _INIT) if init is not None else {}
        self.replaced = [n for n in source.tensors() if not _LORA.match(n)]
        ranks = {source.info(p.a).shape[0] for p in self.pairs.values()}
        self.rank = ranks.pop() if len(ranks) == 1 else None
        self.alpha = alpha
        self.scale = 1.0

    def close(self):
        self.source.close()
        if self.init is not None:
            self.init.close()


def _squeezed(shape):
    return tuple(d for d in shape if d != 1)


def open_adapters(model: Source, config, lora=(), lora_alpha=(), pissa_init=()) -> list:
    """Open and check adapters against an opened model before any data is read.

    Args:
        model: the base model's source (official naming, or rwkv.cpp's).
        config: its detected ModelConfig.
        lora: adapter files (RWKV-PEFT checkpoints: LoRA, or PiSSA with its init file).
        lora_alpha: LoRA's alpha: one for every LoRA adapter, or one per adapter in order.
        pissa_init: PiSSA init files (init_pissa.pth); each belongs to the adapter whose
            lora_A/lora_B names it matches.

    Returns:
        list of Adapter, in the order given.

    Raises:
        ConversionError: an adapter names a tensor the model lacks, a shape disagrees,
            an alpha is missing or has nothing to apply to, or an init file matches no adapter.
    """
    from .readers import open_source

    lora, lora_alpha, pissa_init = list(lora), list(lora_alpha), list(pissa_init)
    if pissa_init and not lora:
        raise ConversionError("--pissa-init needs the PiSSA checkpoint it belongs to, given with --lora")
    if len(lora_alpha) not in (0, 1, len(lora)):
        raise ConversionError(f"{len(lora_alpha)} --lora-alpha values for {len(lora)} --lora adapters; "
                              f"give one for all, or one per adapter in order")
    opened = []
    try:
        sources = []
        for path in lora:
            sources.append(open_source(path))
            opened.append(sources[-1])
        inits = []
        for path in pissa_init:
            inits.append(open_source(path))
            opened.append(inits[-1])
        adapters = _pair_up(sources, inits, lora_alpha)
        for ad in adapters:
            _check(model, config, ad)
        _check_overlaps(adapters)
    except BaseException:
        for s in opened:
            s.close()
        raise
    return adapters


def _pair_up(sources, inits, alphas):
    for s in sources:
        names = list(s.tensors())
        other = [n for n in names if _OTHER_PEFT.search(n)]
        if other:
            raise ConversionError(f"{s.path}: holds {other[0]}, an RWKV-PEFT method other than LoRA/PiSSA "
                                  f"(Bone/DiSHA), which rwkvcpu does not merge")
        if is_pissa_init(names):
            raise ConversionError(f"{s.path}: is a PiSSA init file (init_lora_A/B only); pass it with "
                                  f"--pissa-init, and the trained checkpoint with --lora")
        if not any(_LORA.match(n) for n in names):
            raise ConversionError(f"{s.path}: holds no lora_A/lora_B tensors; not a LoRA or PiSSA adapter")
    owner = {}
    for init in inits:
        if not is_pissa_init(init.tensors()):
            raise ConversionError(f"{init.path}: is not a PiSSA init file (expected only *.init_lora_A / "
                                  f"*.init_lora_B, as RWKV-PEFT's init_pissa.pth)")
        targets = set(low_rank_pairs(init, _INIT))
        hits = [i for i, s in enumerate(sources) if set(low_rank_pairs(s)) == targets]
        if len(hits) != 1:
            raise ConversionError(
                f"{init.path}: its init_lora_A/B names match {'no' if not hits else 'several'} --lora adapters' "
                f"lora_A/B; give the PiSSA checkpoint trained from it")
        if hits[0] in owner:
            raise ConversionError(f"{init.path} and {owner[hits[0]].path} are both PiSSA init files of "
                                  f"{sources[hits[0]].path}")
        owner[hits[0]] = init
    adapters = []
    for i, s in enumerate(sources):
        init = owner.get(i)
        per_adapter = len(alphas) == len(sources)
        alpha = alphas[i] if per_adapter else (alphas[0] if alphas else None)
        if init is not None:
            if per_adapter:
                raise ConversionError(f"{s.path}: is a PiSSA adapter (merged unscaled); --lora-alpha does not apply to it")
            alpha = None
        elif alpha is None:
            raise ConversionError(
                f"{s.path}: a LoRA adapter needs --lora-alpha, the lora_alpha it was trained with "
                f"(RWKV-PEFT's lora_config; not stored in the file)")
        elif not (float(alpha) > 0 and np.isfinite(float(alpha))):
            raise ConversionError(f"--lora-alpha must be a positive number, got {alpha!r}")
        adapters.append(Adapter(s, init, alpha))
    if alphas and all(ad.kind == "pissa" for ad in adapters):
        raise ConversionError("--lora-alpha does not apply to PiSSA adapters (merged unscaled)")
    return adapters


def _check(model: Source, config, ad: Adapter):
    infos = model.tensors()
    for target, pair in ad.pairs.items():
        if target not in infos:
            raise ConversionError(f"{ad.path}: adapts {target}, which the model {model.path.name} does not have "
                                  f"(an adapter for another architecture or size?)")
        out_in = tuple(infos[target].shape)
        a, b = tuple(ad.source.info(pair.a).shape), tuple(ad.source.info(pair.b).shape)
        if len(out_in) != 2 or len(a) != 2 or len(b) != 2 or a[1] != out_in[1] or b[0] != out_in[0] or a[0] != b[1]:
            raise ConversionError(
                f"{ad.path}: {pair.a} {a} and {pair.b} {b} do not fit {target} {out_in} "
                f"(need A (r, {out_in[1] if len(out_in) == 2 else '?'}) and B ({out_in[0]}, r))")
        if ad.kind == "pissa":
            init = ad.init_pairs[target]
            a0, b0 = tuple(ad.init.info(init.a).shape), tuple(ad.init.info(init.b).shape)
            if a0 != a or b0 != b:
                raise ConversionError(f"{ad.init.path}: {init.a} {a0} / {init.b} {b0} do not match the checkpoint's "
                                      f"{a} / {b}")
    if ad.kind == "lora":
        rank = ad.rank
        if rank is None:
            raise ConversionError(f"{ad.path}: its lora_A tensors have different ranks; RWKV-PEFT trains one rank")
        ad.scale = float(ad.alpha) / rank
    transformed = _transformed_by_source(model, config)
    for name in ad.replaced:
        if name not in infos:
            hint = "; pass a state-tuning file with --state" if name.endswith("time_state") else ""
            raise ConversionError(f"{ad.path}: replaces {name}, which the model {model.path.name} does not have{hint}")
        got, want = tuple(ad.source.info(name).shape), tuple(infos[name].shape)
        if _squeezed(got) != _squeezed(want):
            raise ConversionError(f"{ad.path}: {name} has shape {got}, the model's is {want}")
        if name.split(".", 2)[-1] in transformed:
            raise ConversionError(
                f"{ad.path}: replaces {name}, which {model.format} files store transformed; merge the adapter "
                f"into the official checkpoint instead")


def _transformed_by_source(model, config) -> set:
    """Per-layer names whose stored values differ from the official ones in this source's naming."""
    if model.naming == OFFICIAL:
        return set()
    from .canonical import _RWKV_CPP_OVERRIDES

    assert model.naming == RWKV_CPP
    return {r.source for r in _RWKV_CPP_OVERRIDES.get(config.family, ())}


def _check_overlaps(adapters):
    """Two adapters may adapt one weight (their updates add up) but not replace one tensor,
    nor may one replace what another adapts: the result would depend on their order."""
    replaced = {}
    for ad in adapters:
        for name in ad.replaced:
            if name in replaced:
                raise ConversionError(f"{ad.path} and {replaced[name]} both replace {name}; merge one of them")
            replaced[name] = ad.path
    for ad in adapters:
        for name in ad.pairs:
            if name in replaced:
                raise ConversionError(f"{ad.path} adapts {name}, which {replaced[name]} replaces")


def merge(w: np.ndarray, adapters, name: str) -> np.ndarray:
    """`w` (the model's `name`) with every adapter's low-rank update added, float64 then float32.

    LoRA: W + (alpha / r) B A. PiSSA: W - B0 A0 + B A.
    """
    acc = None
    for ad in adapters:
        pair = ad.pairs.get(name)
        if pair is None:
            continue
        if acc is None:
            acc = np.array(w, dtype=np.float64)
        a = ad.source.load(pair.a).astype(np.float64)
        b = ad.source.load(pair.b).astype(np.float64)
        if ad.kind == "pissa":
            init = ad.init_pairs[name]
            acc -= ad.init.load(init.b).astype(np.float64) @ ad.init.load(init.a).astype(np.float64)
            acc += b @ a
        else:
            acc += ad.scale * (b @ a)
    return w if acc is None else acc.astype(np.float32)


class MergedSource(Source):
    """A model source with adapters merged: replaced tensors come from the adapter, adapted weights
    get their low-rank updates, everything else is the model's."""

    def __init__(self, model: Source, adapters: list):
        super().__init__(model.path)
        self.model, self.adapters = model, adapters
        self.format, self.naming = model.format, model.naming
        self.files = model.files
        self.ln0_optional = getattr(model, "ln0_optional", False)
        self.details = dict(model.details)
        self.details["adapters"] = "; ".join(describe_merge(ad) for ad in adapters)
        self._infos = dict(model.tensors())
        self._replaced = {n: ad for ad in adapters for n in ad.replaced}

    def group_norm_eps(self, family):
        return self.model.group_norm_eps(family)

    def tokenizer_name(self):
        return self.model.tokenizer_name()

    def load(self, name):
        info = self.info(name)
        ad = self._replaced.get(name)
        if ad is not None:
            return ad.source.load(name).astype(np.float32).reshape(info.shape)
        return merge(self.model.load(name), self.adapters, name)

    def release(self, name):
        self.model.release(name)

    def close(self):
        self.model.close()
        for ad in self.adapters:
            ad.close()


def describe_merge(ad: Adapter) -> str:
    how = f"alpha {ad.alpha:g} / rank {ad.rank}" if ad.kind == "lora" else f"PiSSA with {Path(ad.init.path).name}"
    return (f"{Path(ad.path).name} ({ad.kind.upper() if ad.kind == 'lora' else 'PiSSA'}, {how}, "
            f"{len(ad.pairs)} weights adapted, {len(ad.replaced)} replaced)")
