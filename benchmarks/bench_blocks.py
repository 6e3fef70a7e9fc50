"""What a block of T tokens costs against one token, and where a token's time goes, kernel by kernel.

    python benchmarks/bench_blocks.py MODEL.safetensors                 # T = 1, 2, 4, 8, 16 and 8 sequences
    python benchmarks/bench_blocks.py MODEL.safetensors --profile 1,8   # time per kernel for T = 1 and 8
    python benchmarks/bench_blocks.py MODEL.safetensors --json          # one JSON object (bench_models.py)

Blocks: `model.forward(tokens, state)` with T tokens of one sequence (a prompt
chunk), and `model.step` with T sequences of one token each (a batched decode
step), timed after a warm-up; the median of the repeats. Both read every
weight once per call, so T tokens cost less than T times one.

Profile: the generation module's calls (matrix products by format and shape
class, recurrence, norms, element-wise kernels) wrapped with timers for a few
forward calls; what is left of the call's time is Python and dispatch. The
timers add about a microsecond per call, which the "python" row includes.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np

BLOCKS = (1, 2, 4, 8, 16)
SEQUENCES = 8


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def blocks(model, repeats: int = 20) -> dict:
    """{"forward": {T: ms}, "step": {sequences: ms}} for one sequence's T tokens and for T sequences' one."""
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    _, state = model.forward(rng.integers(0, vocab, 16).tolist())
    out = {"forward": {}, "step": {}}
    for T in BLOCKS:
        tokens = rng.integers(0, vocab, T).tolist()
        out["forward"][T] = _median_ms(lambda: model.forward(tokens, state), repeats if T > 1 else 3 * repeats)
    if hasattr(model, "state_pool"):
        for n in (1, SEQUENCES):
            pool = model.state_pool(n)
            slots = [pool.acquire() for _ in range(n)]
            for s in slots:
                model.step(pool, [(s, rng.integers(0, vocab, 4).tolist())])
            batch = [(s, [int(rng.integers(0, vocab))]) for s in slots]
            out["step"][n] = _median_ms(lambda: model.step(pool, batch), repeats)
    return out


def _category(name, args):
    """A label for a call of the generation module: products by format and shape class."""
    if name == "matmul":
        from rwkvcpu.matrix import format_of
        m = args[0]
        n, k = m.shape
        kind = "low-rank" if min(n, k) < 256 else ("head" if n > 8 * k else "matrix")
        return f"matmul {format_of(m)} {kind}"
    return name


def profile(model, T: int, calls: int = 10) -> dict:
    """ms per forward call of T tokens, by category (see the module docstring), and "total"."""
    import rwkvcpu.generations.common as common
    gen = model._arch
    spent = collections.defaultdict(float)
    counts = collections.defaultdict(int)
    patched = []
    for module in {gen, common}:
        for name, fn in list(vars(module).items()):
            if callable(fn) and (name == "matmul" or hasattr(fn, "py_func") or name in ("wkv4", "wkv5", "wkv7")):
                def timed(*a, _fn=fn, _name=name):
                    t = time.perf_counter()
                    r = _fn(*a)
                    key = _category(_name, a)
                    spent[key] += time.perf_counter() - t
                    counts[key] += 1
                    return r
                patched.append((module, name, fn))
                setattr(module, name, timed)
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    try:
        _, state = model.forward(rng.integers(0, vocab, 16).tolist())
        tokens = rng.integers(0, vocab, T).tolist()
        model.forward(tokens, state)
        spent.clear()
        counts.clear()
        t = time.perf_counter()
        for _ in range(calls):
            model.forward(tokens, state)
        total = (time.perf_counter() - t) / calls * 1e3
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)
    rows = {k: v / calls * 1e3 for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    rows["python and dispatch"] = total - sum(rows.values())
    return {"total": total, "ms": rows, "calls": {k: v // calls for k, v in counts.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", default="1,8", help="token counts to profile (comma-separated; empty: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import rwkvcpu
    model = rwkvcpu.load(args.model, threads=args.threads)
    res = {"blocks": blocks(model), "profile": {}}
    for T in [int(t) for t in args.profile.split(",") if t]:
        res["profile"][T] = profile(model, T)
    if args.json:
        print(json.dumps(res))
        return
    one = res["blocks"]["forward"][1]
    print("| tokens | one sequence: ms | vs one token | sequences x 1 token: ms | vs one |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    step = res["blocks"]["step"]
    for T, ms in res["blocks"]["forward"].items():
        s = step.get(T)
        print(f"| {T} | {ms:.2f} | {ms / one:.2f}x | {'' if s is None else f'{s:.2f}'} | "
              f"{'' if s is None else f'{s / step[1]:.2f}x'} |")
    for T, p in res["profile"].items():
        print(f"\nT = {T}: {p['total']:.2f} ms per call\n\n| kernel | ms | calls |\n| --- | ---: | ---: |")
        for k, v in p["ms"].items():
            print(f"| {k} | {v:.2f} | {p['calls'].get(k, '')} |")


if __name__ == "__main__":
    main()
