"""Make tests/golden/shipped_logits.npz: the training code's fp32 logits on the shipped model.

The weights are read straight from the shipped rwkvcpu file (not from the .pth), upcast to
fp32, and put back into model.py's official layout by undoing the converter's documented
transforms (docs/FORMAT.md, v7): vectors (D) -> (1, 1, D), r_k (D) -> (H, S), low-rank
matrices transposed back; the embedding already has blocks.0.ln0 folded in, so the forward
skips ln0. model.py then runs on the CPU in fp32 with the step-by-step recurrence (wkv7_loop)
over a 512-token passage of dev.txt, tokenized with the tokenizer embedded in the file.

Saved (about 0.6 MB): the tokens; the logits at every position for a fixed set of 128
vocabulary ids; the full logits at 8 positions; the logit of the true next token at every
position; and the sha256 of the model file, so a test can tell a stale golden from a bug.

Usage:
    python models/train/make_golden.py models/rwkv7-13m-gutenberg.safetensors \
        --text ../shared/corpus/dev.txt --out tests/golden/shipped_logits.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from model import Config, RWKV7
from wkv7 import wkv7_loop

PASSAGE_TOKENS = 512
PASSAGE_START_CHAR = 1_000_000      # the passage starts at the first paragraph after this
FULL_POSITIONS = [0, 1, 2, 63, 255, 256, 510, 511]
N_SUBSET = 128


def read_shipped(path: Path):
    """(fp32 numpy tensors, metadata) of an rwkvcpu fp32/fp16 file."""
    tensors = {}
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dtype not in (np.float16, np.float32):
                raise ValueError(f"{path}: {name} is {t.dtype}; golden needs an fp32/fp16 file")
            tensors[name] = t.astype(np.float32)
    return tensors, meta


def training_state_dict(tensors: dict, meta: dict):
    """model.py's Config and state dict holding exactly the file's weights (fp32)."""
    D, L, H = int(meta["n_embd"]), int(meta["n_layer"]), int(meta["n_head"])
    S = int(meta["head_size"])
    lora = json.loads(meta["lora_dims"])
    cfg = Config(vocab_size=int(meta["vocab_size"]), n_layer=L, n_embd=D, head_size=S,
                 dim_ffn=int(meta["dim_ffn"]), d_decay=lora["Dw"], d_aaa=lora["Da"],
                 d_mv=lora["Dv"], d_gate=lora["Dg"])
    unused = set(tensors)

    def take(name):
        unused.discard(name)
        return torch.from_numpy(tensors[name])

    sd = {"emb.weight": take("emb.weight"), "head.weight": take("head.weight"),
          "ln_out.weight": take("ln_out.weight"), "ln_out.bias": take("ln_out.bias"),
          # folded into emb.weight by the converter; not applied (ln0_folded=True)
          "blocks.0.ln0.weight": torch.ones(D), "blocks.0.ln0.bias": torch.zeros(D)}
    for i in range(L):
        p = f"blocks.{i}."
        for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                  "att.receptance.weight", "att.key.weight", "att.value.weight",
                  "att.output.weight", "att.ln_x.weight", "att.ln_x.bias",
                  "ffn.key.weight", "ffn.value.weight"):
            sd[p + n] = take(p + n)
        for n in ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
                  "att.w0", "att.a0", "att.k_k", "att.k_a", "ffn.x_k"):
            sd[p + n] = take(p + n).view(1, 1, D)
        sd[p + "att.r_k"] = take(p + "att.r_k").view(H, S)
        for pair in ("w", "a", "v", "g"):
            if pair == "v" and i == 0:
                continue
            sd[p + f"att.{pair}1"] = take(p + f"att.{pair}1").t().contiguous()   # (D, r)
            sd[p + f"att.{pair}2"] = take(p + f"att.{pair}2").t().contiguous()   # (r, D)
        if i == 0:
            # layer 0's value-residual weights are unused (and not stored)
            sd[p + "att.v0"] = torch.zeros(1, 1, D)
            sd[p + "att.v1"] = torch.zeros(D, cfg.d_mv)
            sd[p + "att.v2"] = torch.zeros(cfg.d_mv, D)
        else:
            sd[p + "att.v0"] = take(p + "att.v0").view(1, 1, D)
    if unused:
        raise ValueError(f"tensors not used: {sorted(unused)}")
    return cfg, sd


def passage_tokens(text_path: Path, tokenizer: Tokenizer):
    text = text_path.read_text(encoding="utf-8")
    start = text.index("\n\n", PASSAGE_START_CHAR) + 2
    ids = tokenizer.encode(text[start:start + 16 * PASSAGE_TOKENS]).ids[:PASSAGE_TOKENS]
    assert len(ids) == PASSAGE_TOKENS
    return np.asarray(ids, dtype=np.int32), start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, default=Path("../shared/corpus/dev.txt"))
    ap.add_argument("--out", type=Path, default=Path("tests/golden/shipped_logits.npz"))
    args = ap.parse_args()

    tensors, meta = read_shipped(args.model)
    assert meta["generation"] == "v7" and float(meta["group_norm_eps"]) == 64e-5
    cfg, sd = training_state_dict(tensors, meta)
    model = RWKV7(cfg)
    model.load_state_dict(sd)
    model.eval()

    tokenizer = Tokenizer.from_str(meta["tokenizer_json"])
    tokens, start_char = passage_tokens(args.text, tokenizer)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long()[None], wkv=wkv7_loop, ln0_folded=True)[0]
    logits = logits.numpy().astype(np.float32)                      # (T, V)

    rng = np.random.default_rng(0)
    subset = np.sort(np.concatenate([np.arange(16), rng.choice(
        np.arange(16, cfg.vocab_size), N_SUBSET - 16, replace=False)])).astype(np.int32)
    nll = -torch.log_softmax(torch.from_numpy(logits[:-1]), -1)[
        torch.arange(PASSAGE_TOKENS - 1), torch.from_numpy(tokens[1:]).long()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        tokens=tokens,
        subset_ids=subset,
        subset_logits=logits[:, subset],
        full_positions=np.asarray(FULL_POSITIONS, dtype=np.int32),
        full_logits=logits[FULL_POSITIONS],
        next_token_logits=logits[np.arange(PASSAGE_TOKENS - 1), tokens[1:]],
        model_sha256=np.asarray(hashlib.sha256(args.model.read_bytes()).hexdigest()),
        passage_start_char=np.asarray(start_char),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {PASSAGE_TOKENS} tokens from "
          f"char {start_char} of {args.text.name}, mean NLL {nll.mean().item():.4f}")


if __name__ == "__main__":
    main()
