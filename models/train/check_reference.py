"""Check model.py against the reference `rwkv` package (RWKV_x070) on the CPU.

Builds a small model with random (not initial) weights, saves it as an official bf16 .pth,
loads that file with `rwkv.model.RWKV(path, 'cpu fp32')`, and compares the reference's logits
with model.py's fp32 forward on the same bf16 weights. With --pth, checks a trained checkpoint
instead (its first 128 tokens of a fixed pseudo-random sequence).

Usage:
    python models/train/check_reference.py [--pth scratch/rwkv7-tiny.pth]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from model import Config, RWKV7


def model_from_official(sd: dict) -> RWKV7:
    """A model.py module holding exactly the (bf16) weights of an official state dict, in fp32."""
    H, N = sd["blocks.0.att.r_k"].shape
    V, D = sd["emb.weight"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = Config(vocab_size=V, n_layer=L, n_embd=D, head_size=N,
                 dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
                 d_decay=sd["blocks.0.att.w1"].shape[1], d_aaa=sd["blocks.0.att.a1"].shape[1],
                 d_mv=sd["blocks.0.att.v1"].shape[1], d_gate=sd["blocks.0.att.g1"].shape[1])
    model = RWKV7(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


def reference_logits(pth: Path, tokens) -> torch.Tensor:
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "0")
    from rwkv.model import RWKV  # imported late: it reads the environment at import time

    ref = RWKV(str(pth.with_suffix("")), "cpu fp32")
    logits, _ = ref.forward(list(tokens), None, full_output=True)
    return logits.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pth", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.pth:
        pth = args.pth
        sd = torch.load(pth, map_location="cpu")
    else:
        cfg = Config(vocab_size=512, n_layer=3, n_embd=128, head_size=64, dim_ffn=512)
        model = RWKV7(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        from export_pth import official_state_dict
        sd = official_state_dict(model.state_dict(), cfg)
        pth = Path(tempfile.mkdtemp()) / "random-v7.pth"
        torch.save(sd, pth)
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16, k
    mine = model_from_official(sd)
    V = sd["emb.weight"].shape[0]
    tokens = torch.randint(0, V, (128,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = mine(tokens[None])[0]
    theirs = reference_logits(pth, tokens.tolist())
    diff = (ours - theirs).abs().max().item()
    print(f"{pth}: max |logits - reference| = {diff:.2e} over {len(tokens)} tokens "
          f"(logit scale {theirs.abs().max().item():.1f})")
    assert diff < 1e-3, "model.py disagrees with the reference rwkv package"


if __name__ == "__main__":
    main()
