"""Matrix-vector kernels against the memory-bandwidth floor, at the v7 0.4B model's shapes.

    python benchmarks/bench_kernels.py              # 1 and all physical cores
    python benchmarks/bench_kernels.py --threads 2

For each format and shape, enough distinct copies of the matrix to exceed the
caches are multiplied in turn (as a decode step meets them: never twice in a
row), and the bytes read per second are set against a streaming read of the
same amount of memory with the same threads (kernels/stream.py), measured
between the formats. Also the single-thread compute ceiling: one matrix small
enough to stay in the caches, repeated.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rwkvcpu import matrix as M
from rwkvcpu import threads
from rwkvcpu.kernels.stream import read_rows
from rwkvcpu.formats import FORMATS

SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (65536, 1024)]
FORMAT_NAMES = ("fp32", "fp16", "int8", "int4")


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth(nbytes=512 << 20):
    a = np.ones((1024, nbytes // 4096), np.float32)
    out = np.empty(1024, np.float32)
    read_rows(a, out)
    return a.nbytes / _best(lambda: read_rows(a, out), 5)


def stream_matvec(fmt, shape, rng, total=300 << 20):
    """Bytes/s of matvec over distinct copies of one (out, in) matrix."""
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    m0 = M.from_parts(fmt, FORMATS[fmt].quantize(w))
    copies = [type(m0)(*[a.copy() for a in m0]) for _ in range(max(2, total // M.nbytes(m0)))]
    x = rng.standard_normal(shape[1]).astype(np.float32)
    out = np.empty(shape[0], np.float32)

    def run():
        for m in copies:
            M.matvec(m, x, out)
    run()
    return M.nbytes(m0) * len(copies) / _best(run, 5)


def cached_matvec(fmt, rng, shape=(512, 1024)):
    """Weights per second of one cache-resident matrix, repeated: the compute ceiling."""
    w = rng.standard_normal(shape, dtype=np.float32)
    m = M.from_parts(fmt, FORMATS[fmt].quantize(w))
    x = rng.standard_normal(shape[1]).astype(np.float32)
    out = np.empty(shape[0], np.float32)

    def run():
        for _ in range(200):
            M.matvec(m, x, out)
    run()
    return 200 * w.size / _best(run, 5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default: 1 and physical cores)")
    args = ap.parse_args()
    counts = args.threads or sorted({1, threads.physical_cores()})
    rng = np.random.default_rng(0)
    for n in counts:
        threads.configure(n)
        print(f"\n## {n} thread{'s' * (n > 1)}\n")
        print("| format | shape | GB/s | bandwidth GB/s | % of bandwidth | Gweights/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for fmt in FORMAT_NAMES:
            bw = bandwidth()
            for shape in SHAPES:
                rate = stream_matvec(fmt, shape, rng)
                bits = FORMATS[fmt].bits_per_weight
                print(f"| {fmt} | {shape[0]}x{shape[1]} | {rate / 1e9:.1f} | {bw / 1e9:.1f} | "
                      f"{100 * rate / bw:.0f}% | {rate * 8 / bits / 1e9:.1f} |", flush=True)
    threads.configure(1)
    print("\n## Compute ceiling, 1 thread, 512x1024 in cache\n")
    print("| format | Gweights/s |\n| --- | ---: |")
    for fmt in FORMAT_NAMES:
        print(f"| {fmt} | {cached_matvec(fmt, rng) / 1e9:.1f} |")


if __name__ == "__main__":
    main()
