"""RWKV-PEFT LoRA and PiSSA adapters merged at conversion (`rwkvcpu convert BASE OUT --lora ...`).

Adapters are made here the way RWKV-PEFT saves them (official keys, `X.lora_A` (r, in),
`X.lora_B` (out, r), plus the fully trained `train_parts` tensors), and every merge is
checked against a merge computed independently in numpy from RWKV-PEFT's formulas
(merge/merge_lora.py, merge_pissa.py): the converted tensors, and the logits of the
merged model against the numpy reference (and the `rwkv` package) fed the merged weights.
"""

import subprocess
import sys

import numpy as np
import pytest

import rwkvcpu
from conftest import requires_oracle
from reference import official as ref_official
from reference import v6 as ref_v6
from reference import v7 as ref_v7
from reference.oracle import run_oracle
from rwkvcpu.errors import ConversionError
from rwkvcpu.quant.convert import convert, read_checkpoint
from checkpoints import random_official_state_dict, to_bf16, write_pth

DIMS = dict(n_layer=2, n_embd=64, vocab_size=256, head_size=32)
TOKENS = [5, 200, 17, 64, 3, 99, 180, 42]
TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def make_adapter(sd, rank, seed, targets=TARGETS, replace=()):
    """An RWKV-PEFT LoRA checkpoint for `sd`: A small random, B as after some training."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(DIMS["n_layer"]):
        for t in targets:
            w = sd[f"blocks.{i}.{t}.weight"]
            out[f"blocks.{i}.{t}.lora_A"] = (rng.standard_normal((rank, w.shape[1])) / np.sqrt(w.shape[1])).astype(np.float32)
            out[f"blocks.{i}.{t}.lora_B"] = (rng.standard_normal((w.shape[0], rank)) * 0.05).astype(np.float32)
    for name in replace:
        out[name] = (sd[name] + rng.standard_normal(sd[name].shape).astype(np.float32) * 0.1).astype(np.float32)
    # RWKV-PEFT trains in bf16 and saves bf16, as write_pth does by default.
    return {k: to_bf16(v) for k, v in out.items()}


def numpy_merge(sd, adapters):
    """RWKV-PEFT's merge, independently: replace, then W + alpha/r B A (LoRA) or W - B0 A0 + B A (PiSSA)."""
    out = {k: v.astype(np.float64) for k, v in sd.items()}
    for ad, how in adapters:
        for k, v in ad.items():
            if not k.endswith(("lora_A", "lora_B")):
                out[k] = v.astype(np.float64)
    for ad, how in adapters:
        for k in ad:
            if k.endswith(".lora_A"):
                p = k[:-len(".lora_A")]
                a, b = ad[p + ".lora_A"].astype(np.float64), ad[p + ".lora_B"].astype(np.float64)
                if how[0] == "lora":
                    out[p + ".weight"] = out[p + ".weight"] + how[1] / a.shape[0] * (b @ a)
                else:
                    init = how[1]
                    out[p + ".weight"] = (out[p + ".weight"] - init[p + ".init_lora_B"].astype(np.float64)
                                          @ init[p + ".init_lora_A"].astype(np.float64) + b @ a)
    return {k: v.astype(np.float32) for k, v in out.items()}


def reference_logits(gen, sd):
    config, tensors = ref_official.canonical_from_official(gen, sd)
    W = {k: v.astype(np.float64) for k, v in tensors.items()}
    return (ref_v7 if gen == "v7" else ref_v6).forward(config, W, TOKENS)[0]


@pytest.fixture(params=["v6", "v7"])
def base(request, tmp_path):
    gen = request.param
    sd = random_official_state_dict(gen, seed=3, **DIMS)
    return gen, sd, write_pth(tmp_path / "base.pth", sd)


def _replaced(gen):
    # RWKV-PEFT's default train_parts ("time", "ln") save these whole.
    extra = "att.time_maa_x" if gen == "v6" else "att.w1"
    return ("blocks.1.ln1.weight", "blocks.0.att.ln_x.bias", f"blocks.1.{extra}", "blocks.0.ln0.weight")


def test_lora_merge_matches_numpy_and_the_reference(base, tmp_path):
    gen, sd, pth = base
    ad = make_adapter(sd, rank=8, seed=1, replace=_replaced(gen))
    write_pth(tmp_path / "rwkv-0.pth", ad)
    merged = numpy_merge(sd, [(ad, ("lora", 16.0))])
    write_pth(tmp_path / "merged.pth", merged, dtype="fp32")
    meta, got = read_checkpoint(pth, dtype="fp32", lora=[tmp_path / "rwkv-0.pth"], lora_alpha=[16])
    _, want = read_checkpoint(tmp_path / "merged.pth", dtype="fp32")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # the merge changed what it should: adapted weights moved, replaced tensors are the adapter's
    _, plain = read_checkpoint(pth, dtype="fp32")
    assert np.abs(got["blocks.0.att.key.weight"] - plain["blocks.0.att.key.weight"]).max() > 1e-3
    assert '"kind": "lora", "alpha": 16.0, "rank": 8' in meta["adapters"]
    out = tmp_path / "tuned.safetensors"
    convert(pth, out, dtype="fp32", lora=[tmp_path / "rwkv-0.pth"], lora_alpha=[16], progress=False)
    logits, _ = rwkvcpu.load(out).forward(TOKENS, all_logits=True)
    assert np.abs(logits - reference_logits(gen, merged)).max() <= 1e-4


@requires_oracle
def test_lora_merged_model_matches_the_rwkv_package(tmp_path):
    sd = random_official_state_dict("v7", seed=4, **DIMS)
    ad = make_adapter(sd, rank=4, seed=2, replace=_replaced("v7"))
    write_pth(tmp_path / "base.pth", sd)
    write_pth(tmp_path / "ad.pth", ad)
    merged = numpy_merge(sd, [(ad, ("lora", 8.0))])
    ref = run_oracle([{"sd": merged, "generation": "v7", "tokens": TOKENS}])[0]
    out = tmp_path / "tuned.safetensors"
    convert(tmp_path / "base.pth", out, dtype="fp32", lora=[tmp_path / "ad.pth"], lora_alpha=[8], progress=False)
    logits, _ = rwkvcpu.load(out).forward(TOKENS, all_logits=True)
    assert np.abs(logits - ref["one"]).max() <= 1e-4


def test_pissa_and_several_adapters(base, tmp_path):
    gen, sd, pth = base
    # PiSSA: the init file holds B0 A0 (the weight's principal part), the checkpoint B A after training.
    init_ad = make_adapter(sd, rank=4, seed=5, targets=("att.key", "ffn.key"))
    init = {k.replace(".lora_", ".init_lora_"): v for k, v in init_ad.items()}
    trained = {k: to_bf16(v + np.float32(0.01)) for k, v in init_ad.items()}
    lora = make_adapter(sd, rank=2, seed=6, targets=("att.key", "att.value"), replace=("blocks.1.ln2.bias",))
    for name, d in (("init_pissa.pth", init), ("pissa.pth", trained), ("lora.pth", lora)):
        write_pth(tmp_path / name, d)
    merged = numpy_merge(sd, [(trained, ("pissa", init)), (lora, ("lora", 4.0))])
    write_pth(tmp_path / "merged.pth", merged, dtype="fp32")
    meta, got = read_checkpoint(pth, dtype="fp32", lora=[tmp_path / "pissa.pth", tmp_path / "lora.pth"],
                                lora_alpha=[4], pissa_init=[tmp_path / "init_pissa.pth"])
    _, want = read_checkpoint(tmp_path / "merged.pth", dtype="fp32")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert '"kind": "pissa", "init_file": "init_pissa.pth"' in meta["adapters"]


def test_merge_into_a_gguf_base(tmp_path):
    """A quantization-free GGUF base merges like its official checkpoint (names are official after reading)."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install '.[gguf]')")
    from pathlib import Path

    from reference import gguf_models
    sd = gguf_models.official("v6-d64")
    write_pth(tmp_path / "base.pth", sd, dtype="fp32")
    ad = make_adapter(sd, rank=4, seed=7, targets=("att.gate", "ffn.receptance"), replace=("blocks.1.att.time_maa_w1",))
    write_pth(tmp_path / "ad.pth", ad)
    gguf_file = Path(__file__).resolve().parent / "fixtures" / "gguf" / "v6-d64-F16.gguf"
    kw = dict(dtype="fp32", tokenizer="bytes", lora=[tmp_path / "ad.pth"], lora_alpha=[4])
    _, got = read_checkpoint(gguf_file, **kw)
    _, want = read_checkpoint(tmp_path / "base.pth", **kw)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)


def test_adapters_refused_clearly(base, tmp_path):
    gen, sd, pth = base
    good = make_adapter(sd, rank=4, seed=8)
    write_pth(tmp_path / "good.pth", good)
    cases = []

    def case(name, tensors, message, **kw):
        if tensors is not None:
            write_pth(tmp_path / name, tensors)
        cases.append((tmp_path / name, message, {"lora_alpha": [1], **kw}))

    case("missing.pth", {**good, "blocks.7.att.key.lora_A": good["blocks.0.att.key.lora_A"],
                         "blocks.7.att.key.lora_B": good["blocks.0.att.key.lora_B"]},
         "adapts blocks.7.att.key.weight, which the model base.pth does not have")
    wrong = dict(good)
    wrong["blocks.0.ffn.key.lora_A"] = np.zeros((4, 32), np.float32)
    case("shape.pth", wrong, r"blocks.0.ffn.key.lora_A \(4, 32\) and blocks.0.ffn.key.lora_B .* do not fit "
                             r"blocks.0.ffn.key.weight")
    case("lone.pth", {"blocks.0.att.key.lora_A": good["blocks.0.att.key.lora_A"]}, "without its B half")
    case("replaces.pth", {**good, "blocks.0.att.nonsense": np.zeros(64, np.float32)},
         "replaces blocks.0.att.nonsense, which the model base.pth does not have")
    case("reshaped.pth", {**good, "blocks.0.ln1.weight": np.zeros(32, np.float32)},
         r"blocks.0.ln1.weight has shape \(32,\), the model's is \(64,\)")
    case("good.pth", None, "needs --lora-alpha", lora_alpha=[])
    case("init.pth", {k.replace(".lora_", ".init_lora_"): v for k, v in good.items()},
         "is a PiSSA init file .* pass it with --pissa-init")
    case("bone.pth", {**good, "blocks.0.att.key.bone": np.zeros((4, 64), np.float32)}, "Bone/DiSHA")
    case("plain.pth", {"blocks.0.ln1.weight": sd["blocks.0.ln1.weight"]}, "holds no lora_A/lora_B")
    for path, message, kw in cases:
        with pytest.raises(ConversionError, match=message):
            read_checkpoint(pth, dtype="fp32", lora=[path], **kw)
    with pytest.raises(ConversionError, match="2 --lora-alpha values for 1 --lora adapters"):
        read_checkpoint(pth, lora=[tmp_path / "good.pth"], lora_alpha=[1, 2])
    write_pth(tmp_path / "i.pth", {"blocks.0.ffn.key.init_lora_A": good["blocks.0.ffn.key.lora_A"],
                                   "blocks.0.ffn.key.init_lora_B": good["blocks.0.ffn.key.lora_B"]})
    with pytest.raises(ConversionError, match="match no --lora adapters"):
        read_checkpoint(pth, lora=[tmp_path / "good.pth"], lora_alpha=[1], pissa_init=[tmp_path / "i.pth"])
    write_pth(tmp_path / "r1.pth", {**good, "blocks.0.ln1.weight": sd["blocks.0.ln1.weight"]})
    with pytest.raises(ConversionError, match="both replace blocks.0.ln1.weight"):
        read_checkpoint(pth, lora=[tmp_path / "r1.pth", tmp_path / "r1.pth"], lora_alpha=[1])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkvcpu.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_convert_with_lora_and_info(tmp_path):
    sd = random_official_state_dict("v7", seed=9, **DIMS)
    pth = write_pth(tmp_path / "base.pth", sd)
    ad = make_adapter(sd, rank=4, seed=10, replace=("blocks.0.ln1.weight",))
    write_pth(tmp_path / "rwkv-0.pth", ad)
    info = run_cli("info", tmp_path / "rwkv-0.pth")
    assert info.returncode == 0, info.stderr
    for line in ("format:           RWKV-PEFT LoRA/PiSSA adapter (pth)", "rank:             4",
                 "adapted weights:  12: att.key x2, att.output x2, att.receptance x2, att.value x2, ffn.key x2, "
                 "ffn.value x2", "replaced tensors: 1: blocks.0.ln1.weight"):
        assert line in info.stdout, info.stdout
    write_pth(tmp_path / "init_pissa.pth", {k.replace(".lora_", ".init_lora_"): v for k, v in ad.items() if "lora" in k})
    info = run_cli("info", tmp_path / "init_pissa.pth")
    assert info.returncode == 0 and "format:          RWKV-PEFT PiSSA init file (pth)" in info.stdout, info.stdout
    assert "use:             rwkvcpu convert MODEL DST --lora CHECKPOINT --pissa-init FILE" in info.stdout
    out = tmp_path / "tuned.safetensors"
    r = run_cli("convert", pth, out, "--lora", tmp_path / "rwkv-0.pth", "--dtype", "int8", "-q")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs --lora-alpha" in r.stderr
    assert not out.exists()
    r = run_cli("convert", pth, out, "--lora", tmp_path / "rwkv-0.pth", "--lora-alpha", "x")
    assert r.returncode == 2 and "--lora-alpha 'x' is not a number" in r.stderr
    r = run_cli("convert", pth, out, "--lora", tmp_path / "rwkv-0.pth", "--lora-alpha", "8", "--dtype", "int8", "-q")
    assert r.returncode == 0, r.stderr
    assert "rwkv-0.pth" in rwkvcpu.load(out).metadata["adapters"]


def test_rwkvcpp_base(tmp_path):
    """An rwkv.cpp base takes LoRA updates on its matrices; tensors it stores transformed cannot be replaced."""
    from conftest import tiny_model_path
    from rwkvcpu.quant.readers import open_source

    path = tiny_model_path("v7")
    with open_source(path) as src:
        key = src.load("blocks.0.att.key.weight")
        w1 = src.load("blocks.0.att.w1")
    rng = np.random.default_rng(11)
    ad = {"blocks.0.att.key.lora_A": to_bf16(rng.standard_normal((2, key.shape[1])).astype(np.float32)),
          "blocks.0.att.key.lora_B": to_bf16(rng.standard_normal((key.shape[0], 2)).astype(np.float32) * 0.1)}
    write_pth(tmp_path / "ad.pth", ad)
    _, got = read_checkpoint(path, dtype="fp32", lora=[tmp_path / "ad.pth"], lora_alpha=[2])
    want = key.astype(np.float64) + ad["blocks.0.att.key.lora_B"].astype(np.float64) @ ad["blocks.0.att.key.lora_A"]
    np.testing.assert_allclose(got["blocks.0.att.key.weight"], want, rtol=1e-6, atol=1e-7)
    write_pth(tmp_path / "w1.pth", {**ad, "blocks.0.att.w1": np.zeros(w1.shape, np.float32)})
    with pytest.raises(ConversionError, match="replaces blocks.0.att.w1, which rwkv.cpp files store transformed"):
        read_checkpoint(path, lora=[tmp_path / "w1.pth"], lora_alpha=[2])
