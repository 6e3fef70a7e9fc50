"""Time from `import rwkvcpu` to the first logits, with numba's kernel cache empty and warm.

    python benchmarks/bench_startup.py                 # v7 0.1B shape (L12 D768 vocab 65536), int8
    python benchmarks/bench_startup.py --dtype fp16 --runs 5
    python benchmarks/bench_startup.py --generate      # `rwkvcpu generate` with the shipped model

--generate times what a user waits for after `pip install`: the whole
`rwkvcpu generate "Once upon a time" -n 1` process, from its start to its exit
(one token after the prompt), cold and warm.

Each measurement is a fresh Python process that imports rwkvcpu, loads the
model and computes the logits of one token. "cold" points NUMBA_CACHE_DIR at
an empty folder, so every kernel the first token needs is compiled; "warm"
runs again with that folder now filled, as every run after the first one on a
user's machine does (the kernels are loaded from disk, none is compiled).
The model is a random checkpoint in the official layout, converted once and
kept in --work, like benchmarks/bench_models.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import rwkvcpu
t1 = time.perf_counter()
model = rwkvcpu.load(sys.argv[1])
t2 = time.perf_counter()
logits, _ = model.forward([11])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_logits_s": t3 - t2, "total_s": t3 - t0}))
"""


def model_file(work: Path, dtype: str) -> Path:
    """The v7 0.1B-shaped model at `dtype`, made once (random official checkpoint, then converted)."""
    from rwkvcpu.quant.convert import convert
    from checkpoints import random_official_state_dict, write_pth
    work.mkdir(parents=True, exist_ok=True)
    dst = work / f"v7-0.1b-{dtype}.safetensors"
    if not dst.exists():
        pth = work / "v7-0.1b.pth"
        if not pth.exists():
            print(f"writing {pth}", file=sys.stderr)
            write_pth(pth, random_official_state_dict("v7", 12, 768, 65536, seed=0))
        print(f"converting to {dtype}", file=sys.stderr)
        convert(pth, dst, dtype=dtype, progress=False)
    return dst


def run_child(path: Path, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


GENERATE = ["-m", "rwkvcpu.cli.main", "generate", "Once upon a time", "-n", "1", "--seed", "1"]


def _timed(cmd, env) -> tuple:
    """(wall seconds, CPU seconds) of a child process. The CPU time hardly depends on what else
    runs on the machine (compiling is single-threaded work), the wall time does."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def generate_start(runs: int = 3) -> dict:
    """Median wall and CPU seconds of `rwkvcpu generate ... -n 1` with the shipped model, numba's
    cache empty (cold) and filled by the cold run (warm); each in a fresh process."""
    cold, warm = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            cold.append(_timed([sys.executable, *GENERATE], env))
            warm.append(_timed([sys.executable, *GENERATE], env))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"command": "rwkvcpu " + " ".join(GENERATE[2:]), "runs": runs,
            "cold_s": med(cold, 0), "warm_s": med(warm, 0), "cold_cpu_s": med(cold, 1), "warm_cpu_s": med(warm, 1),
            "cold_all": [r[0] for r in cold], "warm_all": [r[0] for r in warm]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="int8", choices=("fp32", "fp16", "int8", "int4"))
    ap.add_argument("--runs", type=int, default=3, help="cold and warm runs each (the median is shown)")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "rwkvcpu-bench"))
    ap.add_argument("--generate", action="store_true", help="time `rwkvcpu generate` with the shipped model")
    args = ap.parse_args()
    if args.generate:
        r = generate_start(args.runs)
        print(f"`{r['command']}`, median of {args.runs} fresh processes: cold {r['cold_s']:.2f} s "
              f"({', '.join(f'{v:.2f}' for v in r['cold_all'])}; CPU {r['cold_cpu_s']:.2f} s), warm "
              f"{r['warm_s']:.2f} s ({', '.join(f'{v:.2f}' for v in r['warm_all'])}; CPU {r['warm_cpu_s']:.2f} s)")
        return
    path = model_file(Path(args.work), args.dtype)
    cold, warm = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            cold.append(run_child(path, cache))
            warm.append(run_child(path, cache))
    print(f"v7-0.1b {args.dtype} ({path.stat().st_size / 1e6:.0f} MB), median of {args.runs} fresh processes each:")
    print("| numba cache | import s | load s | first logits s | import to first logits s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in (("cold (empty)", cold), ("warm", warm)):
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {name} | {med['import_s']:.2f} | {med['load_s']:.2f} | {med['first_logits_s']:.2f} | "
              f"{med['total_s']:.2f} |")


if __name__ == "__main__":
    main()
