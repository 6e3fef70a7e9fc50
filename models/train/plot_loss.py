"""Draw the loss curve of a training run (run.json written by train.py) as a PNG.

Usage:
    python models/train/plot_loss.py models/train/run.json --out models/loss_curve.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dev-bytes-per-token", type=float, default=3.7428)
    args = ap.parse_args()
    run = json.loads(args.run.read_text())
    log = run["log"]
    tok = [e["tokens"] / 1e6 for e in log]
    dev = [(e["tokens"] / 1e6, e["dev_loss"]) for e in log if "dev_loss" in e]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(tok, [e["loss"] for e in log], lw=0.8, label="train loss (mean of 25 steps)")
    ax.plot(*zip(*dev), "o-", ms=3, label="dev.txt loss (64 windows of 512 tokens)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_ylim(2.8, 5.0)
    ax.grid(alpha=0.3)
    bpb = ax.secondary_yaxis(
        "right", functions=(lambda x: x / math.log(2) / args.dev_bytes_per_token,
                            lambda b: b * math.log(2) * args.dev_bytes_per_token))
    bpb.set_ylabel("dev bits per byte")
    cfg = run["config"]
    ax.set_title(f"RWKV-7 L{cfg['n_layer']}-D{cfg['n_embd']}, {run['n_params'] / 1e6:.1f}M params, "
                 f"{run['tokens'] / 1e6:.0f}M tokens, {run['train_seconds'] / 60:.0f} min on one H200",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
