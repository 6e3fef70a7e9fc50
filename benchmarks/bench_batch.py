"""The cost of one batched step of B decoding sequences, against one sequence (B = 1).

    python benchmarks/bench_batch.py MODEL                      # B = 1, 2, 4, 8, 16
    python benchmarks/bench_batch.py MODEL --batch 1,8 --steps 30 --rounds 5

Model.step reads every weight once for all B tokens of a step, so while decoding
is memory-bound a step of B sequences costs little more than one. Each
sequence first reads a short prompt of its own; then every round times
`--steps` decode steps at each B, the B values interleaved so that a busy
moment of the (shared) machine touches all of them alike. Reported: the median
step time, its ratio to B = 1, and the aggregate tokens per second.

A model at an official shape with random weights is made by
`python benchmarks/checkpoints.py OUT.pth --generation v7 --layers 24 --width 1024 --vocab 65536`
then `rwkvcpu convert OUT.pth v7-0.4b-int8.safetensors --dtype int8`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import rwkvcpu


def step_times(model, batches, steps: int, rounds: int) -> dict:
    """B -> the seconds of each timed step, over all rounds."""
    pool = model.state_pool(max(batches))
    rng = np.random.default_rng(0)
    slots = [pool.acquire() for _ in range(max(batches))]
    # Each sequence reads a prompt of its own first, so the states differ.
    model.step(pool, [(s, rng.integers(0, model.config.vocab_size, 8).tolist()) for s in slots])
    times = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            batch = [(s, [int(t)]) for s, t in zip(slots[:b], rng.integers(0, model.config.vocab_size, b))]
            model.step(pool, batch)     # warm: work buffers for b tokens
            for _ in range(steps):
                t0 = time.perf_counter()
                model.step(pool, batch)
                times[b].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an rwkvcpu .safetensors file")
    ap.add_argument("--batch", default="1,2,4,8,16", help="comma-separated sequence counts")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per B and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: one per physical core")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    model = rwkvcpu.load(a.model, threads=a.threads)
    times = step_times(model, batches, a.steps, a.rounds)
    base = statistics.median(times[batches[0]])
    print(f"{model!r}, {model.threads} threads, median of {a.steps * a.rounds} steps\n")
    print(f"| B | ms per step | x B={batches[0]} | tokens/s |")
    print("| ---: | ---: | ---: | ---: |")
    for b in batches:
        t = statistics.median(times[b])
        print(f"| {b} | {t * 1e3:.1f} | {t / base:.2f} | {b / t:.0f} |")


if __name__ == "__main__":
    main()
