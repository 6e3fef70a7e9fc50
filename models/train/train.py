"""Train the shipped RWKV-7 model, in calls of a few minutes that resume each other.

Each call trains for at most --call-seconds, then saves:
  * the full training state (weights, AdamW moments, step, clock, log) under --state, on the
    machine's own disk, so that an immediately following call continues exactly;
  * the fp32 weights as safetensors shards and the whole log under --out, which come back.
A call that finds no state under --state starts from --init (shards of an earlier call, with a
fresh optimizer and a short re-warmup) or, without it, from the official initialisation.

The learning-rate schedule runs on training time, not steps: a linear warmup over --warmup
steps, then a cosine from --lr to --lr-final as the total training time goes from 0 to
--budget-seconds, so the run anneals fully however fast the machine turns out to be. Training
stops when the budget is spent.

Data (prepare_data.py): children.u16 and fiction.u16 token streams; each sequence of a batch
is a random window of --ctx + 1 tokens from the children stream with probability
--children-frac, else from the fiction stream. Windows come from a generator seeded with
(--seed, step), so a resumed run draws what an uninterrupted one would.

Usage:
    python models/train/train.py --data .device/data --out $OUT --state /tmp/rwkv7run \
        --budget-seconds 1000 --call-seconds 480
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from export_pth import load_shards, save_shards
from model import Config, RWKV7, loss_fn
from wkv7 import _WKV7


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--init", type=Path, nargs="*", default=[],
                    help="weight shards to start from when --state holds no full state")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=320)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--dim-ffn", type=int, default=1280)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--lr-final", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--budget-seconds", type=float, required=True)
    ap.add_argument("--call-seconds", type=float, required=True)
    ap.add_argument("--children-frac", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=20251129)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--wkv-warps", type=int, default=4, help="num_warps of the Triton kernels")
    return ap.parse_args()


class Data:
    """Token streams on the training device and the batch sampler."""

    def __init__(self, folder: Path, device, ctx: int, children_frac: float):
        self.info = json.loads((folder / "data.json").read_text())
        self.streams = {}
        for name in ("children", "fiction", "dev"):
            path = folder / f"{name}.u16"
            if path.exists():
                ids = np.fromfile(path, dtype=np.uint16)
                digest = hashlib.sha256(ids.tobytes()).hexdigest()
                assert digest == self.info[name]["tokens_sha256"], f"{path}: sha256 {digest} differs"
                self.streams[name] = torch.from_numpy(ids.astype(np.int32)).to(device)
        self.ctx, self.device = ctx, device
        self.children_frac = children_frac if "fiction" in self.streams else 1.0

    def batch(self, batch: int, seed: int, step: int):
        rng = np.random.default_rng([seed, step])
        from_children = rng.random(batch) < self.children_frac
        idx = []
        for name, rows in (("children", from_children), ("fiction", ~from_children)):
            n = int(rows.sum())
            if n:
                stream = self.streams[name]
                starts = torch.from_numpy(rng.integers(0, stream.numel() - self.ctx - 1, n))
                span = starts.to(self.device)[:, None] + torch.arange(self.ctx + 1, device=self.device)
                idx.append(stream[span])
        seqs = torch.cat(idx).long()
        return seqs[:, :-1], seqs[:, 1:]

    def dev_windows(self, n: int):
        """n non-overlapping windows spread evenly over dev.txt."""
        dev = self.streams["dev"]
        starts = torch.linspace(0, dev.numel() - self.ctx - 2, n).long().to(self.device)
        seqs = dev[starts[:, None] + torch.arange(self.ctx + 1, device=self.device)].long()
        return seqs[:, :-1], seqs[:, 1:]


def optimizer_for(model: RWKV7, args):
    decay, plain, double = [], [], []
    for name, p in model.named_parameters():
        if "att.w0" in name:
            double.append(p)
        elif p.squeeze().dim() >= 2 and ".weight" in name:
            decay.append(p)
        else:
            plain.append(p)
    groups = [
        {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": double, "weight_decay": 0.0, "lr_scale": 2.0},
        {"params": decay, "weight_decay": args.weight_decay, "lr_scale": 1.0},
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), eps=1e-18, fused=fused)


def learning_rate(args, step_in_warmup: int, progress: float) -> float:
    warm = min(1.0, (step_in_warmup + 1) / args.warmup)
    p = min(max(progress, 0.0), 1.0)
    return warm * (args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, windows, autocast) -> float:
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, x.shape[0], 16):
        with autocast():
            _, loss = loss_fn(model, x[i:i + 16], y[i:i + 16])
        total += loss.item() * x[i:i + 16].shape[0]
    model.train()
    return total / x.shape[0]


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    args.state.mkdir(parents=True, exist_ok=True)

    _WKV7.num_warps = args.wkv_warps
    data = Data(args.data, device, args.ctx, args.children_frac)
    cfg = Config(vocab_size=data.info["vocab_size"], n_layer=args.n_layer, n_embd=args.n_embd,
                 head_size=args.head_size, dim_ffn=args.dim_ffn)
    torch.manual_seed(args.seed)
    model = RWKV7(cfg).to(device)
    opt = optimizer_for(model, args)
    run = {"step": 0, "tokens": 0, "train_seconds": 0.0, "log": [], "warmup_from": 0,
           "calls": [], "config": cfg.__dict__, "args": {}}

    full = args.state / "full.pt"
    if full.exists():
        saved = torch.load(full, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        run = saved["run"]
        print(f"resumed full state at step {run['step']}", flush=True)
    elif args.init:
        state, saved_cfg, meta = load_shards(args.init)
        assert saved_cfg.__dict__ == cfg.__dict__, f"config differs: {saved_cfg}"
        model.load_state_dict(state)
        run.update(json.loads(meta["run"]))
        run["warmup_from"] = run["step"]
        print(f"resumed weights at step {run['step']} (fresh optimizer)", flush=True)
    else:
        print(f"new model: {cfg}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    run["n_params"] = n_params
    run["args"] = {k: str(v) for k, v in vars(args).items()}
    run["calls"].append({"start_step": run["step"], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
    print(f"{n_params:,} parameters; tokens per step {args.batch * args.ctx}", flush=True)

    dev_windows = data.dev_windows(args.eval_windows)
    dev_bpt = data.info["dev"]["bytes_per_token"]
    t_call = time.time()
    t_mark, losses = time.time(), []
    while True:
        progress = run["train_seconds"] / args.budget_seconds
        if progress >= 1.0 or time.time() - t_call >= args.call_seconds:
            break
        lr = learning_rate(args, run["step"] - run["warmup_from"], progress)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y = data.batch(args.batch, args.seed, run["step"])
        with autocast():
            loss, ce = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(ce)
        run["step"] += 1
        run["tokens"] += x.numel()

        if run["step"] % args.log_every == 0:
            mean = torch.stack(losses).mean().item()          # synchronises
            now = time.time()
            run["train_seconds"] += now - t_mark
            entry = {"step": run["step"], "tokens": run["tokens"], "loss": round(mean, 4),
                     "lr": lr, "train_seconds": round(run["train_seconds"], 1),
                     "tok_per_s": round(args.log_every * x.numel() / (now - t_mark))}
            if not math.isfinite(mean):
                raise SystemExit(f"loss is {mean} at step {run['step']}")
            if run["step"] % args.eval_every == 0:
                dev = evaluate(model, dev_windows, autocast)
                entry["dev_loss"] = round(dev, 4)
                entry["dev_bpb"] = round(dev / math.log(2) / dev_bpt, 4)
            run["log"].append(entry)
            print(json.dumps(entry), flush=True)
            losses, t_mark = [], time.time()

    dev = evaluate(model, dev_windows, autocast)
    run["final_dev_loss"] = dev
    run["calls"][-1].update({"end_step": run["step"], "wall_seconds": round(time.time() - t_call, 1)})
    print(f"call done: step {run['step']}, tokens {run['tokens']:,}, train time "
          f"{run['train_seconds']:.0f}s / {args.budget_seconds:.0f}s, dev loss {dev:.4f} "
          f"({dev / math.log(2) / dev_bpt:.4f} bits/byte)", flush=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "run": run}, full)
    save_shards(model.state_dict(), cfg, args.out,
                extra={"run": json.dumps({k: run[k] for k in ("step", "tokens", "train_seconds")})})
    (args.out / "run.json").write_text(json.dumps(run, indent=1) + "\n")


if __name__ == "__main__":
    main()
