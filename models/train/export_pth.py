"""Write trained weights as an official RWKV-7 checkpoint (.pth, bf16), as BlinkDL releases them.

The trainer returns fp32 weights as safetensors shards (each under the device tool's 16 MiB
limit on returned files) with the model config in their metadata; this script joins them,
casts every tensor to bf16, and saves the state dict with torch.save. Names and shapes are the
module tree's (model.py), which is the official layout:

    emb.weight (V, D); blocks.0.ln0.*; blocks.i.ln1.*, ln2.* (D)
    blocks.i.att.x_r, x_w, x_k, x_v, x_a, x_g, w0, a0, v0, k_k, k_a (1, 1, D); r_k (H, N)
    blocks.i.att.w1, a1, v1, g1 (D, r); w2, a2, v2, g2 (r, D)
    blocks.i.att.receptance/key/value/output.weight (D, D); att.ln_x.weight/bias (D)
    blocks.i.ffn.x_k (1, 1, D); ffn.key.weight (F, D); ffn.value.weight (D, F)
    ln_out.weight/bias (D); head.weight (V, D)

Usage:
    python models/train/export_pth.py SHARD [SHARD ...] --out scratch/rwkv7-tiny.pth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import Config, RWKV7

SHARD_BYTES = 15_000_000


def save_shards(state: dict, cfg: Config, out_dir: Path, prefix: str = "weights", extra=None):
    """Save fp32 tensors as safetensors shards of at most SHARD_BYTES each (one tensor may exceed).

    Returns the list of written paths.
    """
    meta = {"config": json.dumps(cfg.__dict__), **(extra or {})}
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.detach().float().cpu().contiguous()
        size += nbytes
    shards.append(current)
    paths = []
    for n, shard in enumerate(shards):
        path = out_dir / f"{prefix}-{n}.safetensors"
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
    return paths


def load_shards(paths):
    """Join shards written by save_shards. Returns (state dict of fp32 tensors, Config, metadata)."""
    state, meta = {}, {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            for name in f.keys():
                state[name] = f.get_tensor(name)
    return state, Config(**json.loads(meta["config"])), meta


def official_state_dict(state: dict, cfg: Config) -> dict:
    """The state dict as BlinkDL's releases store it: every tensor bf16, official names/shapes."""
    expected = RWKV7(cfg).state_dict()
    missing = set(expected) ^ set(state)
    if missing:
        raise ValueError(f"checkpoint names differ from the model: {sorted(missing)[:8]}")
    out = {}
    for name, ref in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        out[name] = t.to(torch.bfloat16).contiguous()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    state, cfg, meta = load_shards(args.shards)
    official = official_state_dict(state, cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official, args.out)
    n = sum(t.numel() for t in official.values())
    print(f"wrote {args.out}: {len(official)} tensors, {n:,} parameters, bf16; config {cfg}")


if __name__ == "__main__":
    main()
