"""Time the reference `rwkv` package (strategy 'cpu fp32') on one official .pth model.

Run by bench_models.py in a fresh process per model, and prints one JSON
object with the same figures as `rwkvcpu bench --json`:

    RWKV_V7_ON=1 python benchmarks/reference_worker.py model.pth --threads 2

The package picks the RWKV generation at import time from RWKV_V7_ON, so the
caller sets it (1 for v7 checkpoints).
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from rwkvcpu.bench import peak_rss_bytes, timings  # noqa: E402  (numpy and the standard library only)

TTFT_PROMPT = 16


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pth")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--prompt-runs", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV
        t = time.perf_counter()
        model = RWKV(model=args.pth[:-len(".pth")], strategy="cpu fp32")
        load_s = time.perf_counter() - t
    vocab = int(model.z["emb.weight"].shape[0]) if hasattr(model, "z") else int(model.w["emb.weight"].shape[0])
    rng = np.random.default_rng(0)

    with torch.no_grad():
        logits, state = model.forward(rng.integers(0, vocab, TTFT_PROMPT).tolist(), None)
        token = int(torch.argmax(logits))
        ttft_s = time.perf_counter() - START
        for _ in range(args.warmup):
            logits, state = model.forward([token], state)
            token = int(torch.argmax(logits))
        steps = np.empty(args.tokens)
        for i in range(args.tokens):
            t = time.perf_counter()
            logits, state = model.forward([token], state)
            token = int(torch.argmax(logits))
            steps[i] = time.perf_counter() - t
        prompt = rng.integers(0, vocab, args.prompt).tolist()
        best = float("inf")
        for _ in range(args.prompt_runs):
            t = time.perf_counter()
            model.forward(prompt, None)
            best = min(best, time.perf_counter() - t)

    print(json.dumps({
        "file_bytes": os.path.getsize(args.pth),
        "threads": args.threads,
        "load_s": load_s,
        "ttft_s": ttft_s,
        **timings(steps, best, args.prompt),
        "peak_rss_bytes": peak_rss_bytes(),
    }))


if __name__ == "__main__":
    main()
