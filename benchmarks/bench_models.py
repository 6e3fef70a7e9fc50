"""rwkvcpu against the reference `rwkv` package, on random models at the official shapes.

    python benchmarks/bench_models.py                     # everything, writes benchmarks/RESULTS.md
    python benchmarks/bench_models.py --shapes v7-0.1b --tokens 50 --out /tmp/r.md   # a quick look

For each shape: a random checkpoint in the official .pth layout
(benchmarks/checkpoints.py), converted to fp32, fp16, int8 and int4. Each
model is timed in a fresh process (`rwkvcpu bench --json`), and so is the
reference package (`reference_worker.py`, strategy 'cpu fp32'). The
memory bandwidth is measured in the same run, before and after the models
(the best reading counts: a roofline must not flatter us), and each row shows
its roofline (weight bytes read per token / bandwidth) and the share reached.
int8/int4/fp16 logits are compared with fp32's by KL divergence on the same
tokens, so that a fast but wrong kernel cannot pass for a win.

The machine is shared: each measurement waits for the CPUs to be quiet, is
repeated (up to 3 times) when other processes took over 10% of them meanwhile,
and the CPU share they took is recorded next to it ("busy").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# name -> (generation, layers, width, vocabulary); the official model sizes.
SHAPES = {
    "v4-169m": ("v4", 12, 768, 50277),
    "v7-0.1b": ("v7", 12, 768, 65536),
    "v7-0.4b": ("v7", 24, 1024, 65536),
    "v6-1.6b": ("v6", 24, 2048, 65536),
}
DTYPES = ("fp32", "fp16", "int8", "int4")
# Tokens fed to every dtype of a shape for the KL comparison.
KL_TOKENS = 64
# The targets of issues 5 and 13, checked on this shape.
TARGET_SHAPE = "v7-0.4b"
# rwkv.cpp's formats that pair with ours (the optional peer column, --rwkv-cpp), and the commit measured.
PEER_FORMATS = {"fp16": "FP16", "int8": "Q8_0", "int4": "Q4_0"}
PEER_SOURCE = "rwkv.cpp 4358e70 (ggml c8bd0fe), built with its default native flags"
# A v7 model with the 0.1B model's 12 layers and every call of its decode step,
# but 64-wide: its time per token is the Python and dispatch overhead.
OVERHEAD_SHAPE = ("v7", 12, 64, 256)


# ------------------------------------------------------------------ machine

def _cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:3]) + sum(v[5:8]), sum(v)


class Busy:
    """CPU time that other processes used while a child ran, as a share of all cores."""

    def __enter__(self):
        self.j0 = _cpu_jiffies()
        self.c0 = os.times()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy0, _ = self.j0
        busy1, _ = _cpu_jiffies()
        c1 = os.times()
        wall = time.perf_counter() - self.t0
        hz = os.sysconf("SC_CLK_TCK")
        ours = (c1.children_user - self.c0.children_user + c1.children_system - self.c0.children_system
                + c1.user - self.c0.user + c1.system - self.c0.system)
        others = max(0.0, (busy1 - busy0) / hz - ours)
        self.share = others / (wall * os.cpu_count())


def machine() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                                                    "avx_vnni", "gfni") if f in flags)
                break
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            info["l3"] = f.read().strip()
    except OSError:
        pass
    import numba
    import numpy
    from rwkvcpu.threads import physical_cores
    info.update(physical_cores=physical_cores(), numpy=numpy.__version__, numba=numba.__version__)
    try:
        import threadpoolctl
        blas = [f"{x['internal_api']} {x['version']}" for x in threadpoolctl.threadpool_info() if x["user_api"] == "blas"]
        info["blas"] = ", ".join(blas)
    except ImportError:
        pass
    for pkg in ("torch", "rwkv"):
        try:
            from importlib.metadata import version
            info[pkg] = version(pkg)
        except Exception:
            info[pkg] = "not installed"
    return info


# ------------------------------------------------------------------ steps

def run_json(cmd, env=None, timeout=3600) -> tuple[dict, float]:
    """Run a child that prints one JSON object last; returns it and how busy the machine was."""
    with Busy() as busy:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), busy.share


def wait_for_quiet(seconds=3.0, idle_share=0.85, limit=180.0) -> None:
    """Wait (at most `limit` s) until the CPUs have been at least `idle_share` idle for `seconds`."""
    t0 = time.perf_counter()
    calm = 0.0
    while time.perf_counter() - t0 < limit and calm < seconds:
        busy0, total0 = _cpu_jiffies()
        time.sleep(0.5)
        busy1, total1 = _cpu_jiffies()
        calm = calm + 0.5 if (busy1 - busy0) <= (1 - idle_share) * max(1, total1 - total0) else 0.0


def measured(cmd, env=None, attempts=3, calm=0.10) -> dict:
    """run_json after waiting for a quiet machine; while other processes took more than `calm` of the
    CPUs during the run, try again (at most `attempts` times) and keep the least disturbed result."""
    best = None
    for _ in range(attempts):
        wait_for_quiet()
        r, busy = run_json(cmd, env=env)
        r["busy"] = busy
        if best is None or busy < best["busy"]:
            best = r
        if busy <= calm:
            break
    return best


def bandwidth(threads: int) -> dict:
    code = ("import json; from rwkvcpu.bench import memory_bandwidth as m; "
            f"print(json.dumps({{'1': m(1), '{threads}': m({threads})}}))")
    out, busy = run_json([sys.executable, "-c", code])
    return {int(k): v for k, v in out.items()} | {"busy": busy}


def make_models(work: Path, name: str, shape, log, dtypes=DTYPES, keep_pth=True) -> dict:
    """The .pth checkpoint and its conversions to `dtypes` (kept in `work` between runs; without
    keep_pth the checkpoint is only written when a conversion needs it)."""
    from rwkvcpu.quant.convert import convert
    from checkpoints import iter_random_official, write_pth

    gen, layers, width, vocab = shape
    pth = work / f"{name}.pth"
    missing = [d for d in dtypes if not (work / f"{name}-{d}.safetensors").exists()]
    if not pth.exists() and (keep_pth or missing):
        t = time.perf_counter()
        write_pth(str(pth) + ".tmp", iter_random_official(gen, layers, width, vocab, seed=1))
        os.replace(str(pth) + ".tmp", pth)
        log(f"  wrote {pth.name} ({pth.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    paths = {"pth": pth}
    for dtype in dtypes:
        out = work / f"{name}-{dtype}.safetensors"
        if not out.exists():
            t = time.perf_counter()
            convert(pth, out, dtype=dtype, progress=False)
            log(f"  converted to {dtype} in {time.perf_counter() - t:.0f} s")
        paths[dtype] = out
    return paths


def logits_of(model, tokens) -> np.ndarray:
    """(T, V) float64 logits after each token, fed one at a time."""
    state, rows = None, []
    for t in tokens:
        logits, state = model.forward([t], state)
        rows.append(logits.astype(np.float64))
    return np.array(rows)


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def divergence(p_logits, q_logits) -> dict:
    """Mean KL(p || q) of the rows' distributions, and how often their top-1 tokens agree."""
    a, b = log_softmax(p_logits), log_softmax(q_logits)
    return {"kl": float(np.mean(np.sum(np.exp(a) * (a - b), axis=1))),
            "top1_agree": float(np.mean(a.argmax(1) == b.argmax(1)))}


def kl_worker(paths: list, tokens: list) -> dict:
    """Mean KL(fp32 || other) of the next-token distributions over `tokens`, fed one at a time."""
    import rwkvcpu
    ref = logits_of(rwkvcpu.load(paths[0]), tokens)
    return {path: divergence(ref, logits_of(rwkvcpu.load(path), tokens)) for path in paths[1:]}


def python_overhead(work: Path, threads: int, tokens: int) -> dict:
    from rwkvcpu.quant.convert import convert
    from checkpoints import random_official_state_dict, write_pth

    gen, layers, width, vocab = OVERHEAD_SHAPE
    pth = work / "overhead-v7.pth"
    write_pth(pth, random_official_state_dict(gen, layers, width, vocab, seed=1))
    res = {}
    for dtype in DTYPES:
        path = work / f"overhead-v7-{dtype}.safetensors"
        if not path.exists():
            convert(pth, path, dtype=dtype, progress=False)
        # The first run also compiles (or loads from numba's cache) every kernel the
        # dtype uses, so that the timed runs below start warm.
        run_json(_bench_cmd(path, threads, 5, 16, bandwidth=False))
        res[dtype] = measured(_bench_cmd(path, threads, max(5 * tokens, 1000), 16, bandwidth=False))
    return res


def thread_census(path, threads: int) -> dict:
    """While `rwkvcpu bench` runs a 512-token prompt and decodes, count every 0.5 ms how many of its
    threads are running or waiting for a CPU (state R in /proc: a spinning thread counts too).
    Returns {count: share of samples}."""
    import collections
    cmd = _bench_cmd(path, threads, 100, 512, bandwidth=False)
    wait_for_quiet()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts = collections.Counter()
    tasks = f"/proc/{proc.pid}/task"
    while proc.poll() is None:
        running = 0
        try:
            for tid in os.listdir(tasks):
                with open(f"{tasks}/{tid}/stat") as f:
                    stat = f.read()
                running += stat[stat.rindex(")") + 2] == "R"
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        counts[running] += 1
        time.sleep(0.0005)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items())}


def _bench_cmd(path, threads, tokens, prompt, bandwidth=True):
    """`rwkvcpu bench`, which also measures the bandwidth right after decoding (the
    machine's bandwidth varies with what else runs on its host)."""
    return [sys.executable, "-m", "rwkvcpu.cli.main", "bench", str(path), "--json",
            "--threads", str(threads), "--tokens", str(tokens), "--prompt", str(prompt)] + \
        ([] if bandwidth else ["--no-bandwidth"])


def _peer_cmd(root, path, threads, tokens, prompt):
    """The rwkv.cpp worker on one of its model files (benchmarks/rwkvcpp_worker.py)."""
    return [sys.executable, str(HERE / "rwkvcpp_worker.py"), str(root), str(path), "--threads", str(threads),
            "--tokens", str(tokens), "--prompt", str(prompt)]


def make_peer_models(root, work: Path, name: str, pth: Path, log) -> dict:
    """rwkv.cpp's files of a shape (its own converter and quantizer, through the worker): dtype -> path."""
    paths = {}
    for dtype, fmt in PEER_FORMATS.items():
        out = work / f"{name}-rwkvcpp-{fmt}.bin"
        if not out.exists():
            t = time.perf_counter()
            subprocess.run([sys.executable, str(HERE / "rwkvcpp_worker.py"), str(root), str(out), "--make-from",
                            str(pth)], check=True, capture_output=True)
            log(f"  rwkv.cpp {fmt} made in {time.perf_counter() - t:.0f} s")
        paths[dtype] = out
    return paths


def _keep_best(rows: dict, key: str, r: dict) -> None:
    """rows[key] = the run with the lower decode time; its prefill the best of both."""
    old = rows.get(key)
    if old is None:
        rows[key] = r
        return
    best = dict(r if r["decode_ms"] < old["decode_ms"] else old)
    best["prefill_tok_s"] = max(r["prefill_tok_s"], old["prefill_tok_s"])
    best["rounds"] = old.get("rounds", 1) + 1
    rows[key] = best


def blocks_worker(path, threads: int) -> dict:
    """benchmarks/bench_blocks.py on a model, in a fresh process: block costs and per-kernel times."""
    r, busy = run_json([sys.executable, str(HERE / "bench_blocks.py"), str(path), "--threads", str(threads),
                        "--json", "--profile", "1,8"])
    return r | {"busy": busy}


# ------------------------------------------------------------------ report

# Other benchmarks (bench_serve.py) keep their own sections of RESULTS.md between these markers;
# rewriting the file keeps them.
SECTION = "<!-- section: {} -->"
SECTION_END = "<!-- end of section -->"


def _sections(text: str) -> dict:
    """The marked sections of a results file: title -> the whole block, markers included."""
    out, lines, title, block = {}, text.splitlines(), None, []
    for line in lines:
        if line.startswith("<!-- section: "):
            title, block = line[len("<!-- section: "):-len(" -->")], [line]
        elif title is not None:
            block.append(line)
            if line == SECTION_END:
                out[title] = "\n".join(block)
                title = None
    return out


def write_results(path: Path, text: str) -> None:
    """Write bench_models' report to `path`, keeping the other benchmarks' sections already there."""
    kept = _sections(path.read_text()) if path.exists() else {}
    path.write_text(text.rstrip("\n") + "\n" + "".join(f"\n{block}\n" for block in kept.values()))


def replace_section(path: Path, title: str, body: str) -> None:
    """Put `body` under the heading `## title` in `path`, replacing that section, keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{SECTION.format(title)}\n## {title}\n\n{body.rstrip()}\n{SECTION_END}"
    old = _sections(text).get(title)
    text = text.replace(old, block) if old else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _row(shape, dtype, r, ref, kl, peer=None):
    bw = r["bandwidth_gbs"] * 1e9
    floor = r["weight_bytes_per_token"] / bw * 1e3
    cells = [shape, dtype, f"{r['file_bytes'] / 1e6:.0f}", f"{r['load_s']:.2f}", f"{r['ttft_s']:.2f}",
             f"{r['decode_ms']:.1f}", f"{1e3 / r['decode_ms']:.1f}",
             f"{bw / 1e9:.1f}", f"{floor:.1f}", f"{100 * floor / r['decode_ms']:.0f}%",
             f"{r['prefill_tok_s']:.0f}",
             f"{r['peak_rss_bytes'] / 1e6:.0f} ({100 * r['peak_rss_bytes'] / r['file_bytes']:.0f}%)",
             f"{ref['decode_ms'] / r['decode_ms']:.1f}x" if ref else "",
             f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.1f}x" if ref else "",
             f"{peer['decode_ms'] / r['decode_ms']:.2f}x" if peer else "",
             f"{r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x" if peer else "",
             kl, f"{100 * r['busy']:.0f}%"]
    return "| " + " | ".join(cells) + " |"


def report(results: dict, info: dict, args, elapsed: float) -> str:
    bw = results["bandwidth"]
    n = args.threads
    run = results.setdefault("run", {"command": " ".join(["python benchmarks/bench_models.py", *sys.argv[1:]]),
                                     "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": 0})
    if elapsed:
        # written after every shape: the date is the first write's, the duration the latest's
        run["minutes"] = round(elapsed / 60)
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{run['command']}` on {run['date']} ({run['minutes']} min). Random weights at the official "
        "shapes; every figure from a fresh process; the reference is the `rwkv` package, strategy `cpu fp32`.",
        "",
        "## Machine",
        "",
        f"- CPU: {info.get('cpu', '?')}, {info['cpus']} logical CPUs, {info['physical_cores']} physical cores; "
        f"L3 {info.get('l3', '?')}; SIMD: {info.get('simd', '?')}",
        f"- Memory: {info.get('memory_gb', '?')} GB; bandwidth (numba streaming read of 512 MB) at the start "
        f"and the end of this run: 1 thread {', '.join(f'{b[1] / 1e9:.1f}' for b in bw)} GB/s, {n} threads "
        f"{', '.join(f'{b[n] / 1e9:.1f}' for b in bw)} GB/s. It varies with what else runs on the host, so each "
        "row's roofline uses the bandwidth measured while that row decoded (see the notes).",
        f"- Software: Python {info['python']}, numpy {info['numpy']}, numba {info['numba']}, BLAS "
        f"{info.get('blas', '?')}, torch {info['torch']}, rwkv {info['rwkv']}; Linux {info['kernel']}",
        f"- Threads: {n} for rwkvcpu and for torch.",
        "",
        "## Results",
        "",
        "decode: median ms/token of "
        f"{args.tokens} greedy one-token steps after {16} warm-up steps. roofline: weight bytes read per token / "
        f"bandwidth ({n} threads, measured while decoding), and the share of it reached. prefill: tokens/s for a "
        f"{args.prompt}-token prompt (best of 2). load: opening the model (rwkvcpu maps the file). TTFT: from "
        "the start of the measuring command (imports included, numba's kernel cache warm) to the logits of the "
        "first token after a 16-token prompt. RSS: peak resident memory of the process (and its share of the "
        "file size). vs ref: speed-up over the reference package on the same shape. KL: mean KL(fp32 || dtype) "
        f"of the next-token distributions over {KL_TOKENS} tokens (top-1 agreement in brackets). busy: CPU time "
        "other processes took during that measurement, as a share of all cores.",
        "",
        "| shape | dtype | file MB | load s | TTFT s | decode ms | tok/s | bandwidth GB/s | roofline ms | "
        "% of roofline | prefill tok/s | peak RSS MB | decode vs ref | prefill vs ref | decode vs rwkv.cpp | "
        "prefill vs rwkv.cpp | KL vs fp32 | busy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | ---: |",
    ]
    peers = results.get("peer", {})
    for shape, rows in results["models"].items():
        ref = rows.get("reference")
        peer = peers.get(shape, {})
        for dtype in DTYPES:
            if dtype in rows:
                kl = rows.get("kl", {}).get(dtype)
                kl_cell = "" if dtype == "fp32" else (f"{kl['kl']:.2e} ({100 * kl['top1_agree']:.0f}%)" if kl else "")
                lines.append(_row(shape, dtype, rows[dtype], ref, kl_cell, peer.get(dtype)))
        for dtype, p in peer.items():
            lines.append(_row(shape, f"rwkv.cpp {PEER_FORMATS[dtype]}",
                              p | {"weight_bytes_per_token": p["file_bytes"] - _embedding_bytes(rows)}, None, ""))
        if ref:
            lines.append(_row(shape, "reference fp32", ref | {"weight_bytes_per_token": rows["fp32"]["weight_bytes_per_token"]},
                              None, ""))
    for shape, why in results.get("skipped", {}).items():
        lines.append(f"\n{shape}: not measured: {why}")
    lines += ["", *targets_13(results), *speed_sections(results), *targets(results), "", *NOTES, *peer_notes(results), ""]
    census = results.get("census")
    if census:
        lines += [
            "## Threads running at once",
            "",
            f"Every 0.5 ms while `rwkvcpu bench` ran {TARGET_SHAPE} int8 (a 512-token prompt twice, then 100 "
            f"decode steps, --threads {n}), the number of its threads that were running or waiting for a CPU "
            "(state R: a thread spinning idle counts as running), as a share of the samples:",
            "",
            "| threads running | " + " | ".join(str(k) for k in census) + " |",
            "| --- | " + " | ".join("---:" for _ in census) + " |",
            "| share of samples | " + " | ".join(f"{100 * v:.1f}%" for v in census.values()) + " |",
            "",
        ]
    ov = results.get("overhead")
    if ov:
        lines += [
            "## Per-token Python overhead",
            "",
            f"A v7 model with the 0.1B shape's {OVERHEAD_SHAPE[1]} layers and the same calls per token, but "
            f"{OVERHEAD_SHAPE[2]} wide (its matrices take microseconds), decodes in the time that Python, "
            "numba's dispatch and the small elementwise kernels take per token:",
            "",
            "| dtype | overhead ms/token | v7-0.1b decode ms/token | overhead share |",
            "| --- | ---: | ---: | ---: |",
        ]
        for dtype in DTYPES:
            big = results["models"].get("v7-0.1b", {}).get(dtype)
            if big and dtype in ov:
                lines.append(f"| {dtype} | {ov[dtype]['decode_ms']:.2f} | {big['decode_ms']:.2f} | "
                             f"{100 * ov[dtype]['decode_ms'] / big['decode_ms']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def _embedding_bytes(rows: dict) -> int:
    """fp16 embedding bytes less one row: what a decode step does not read (rwkv.cpp keeps emb and
    head in FP16 in every format; the fp16 row's file tells how big that is)."""
    fp16 = rows.get("fp16")
    if not fp16:
        return 0
    return (fp16["file_bytes"] - fp16["weight_bytes_per_token"])


def _ratio(a, b):
    return a / b if a and b else float("nan")


def targets_13(results: dict) -> list:
    """Issue 13's targets, from this run's same-run ratios."""
    rows = results["models"].get(TARGET_SHAPE, {})
    peer = results.get("peer", {}).get(TARGET_SHAPE, {})
    small = results["models"].get("v7-0.1b", {})
    out = [f"## Targets of issue 13 ({TARGET_SHAPE} unless named; ratios from this run)", "",
           "| target | measured | met |", "| --- | --- | --- |"]

    def add(name, value, ok):
        out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")

    for dtype, want in (("int8", 2.0), ("int4", 2.2)):
        if dtype in rows and dtype in peer:
            r = _ratio(peer[dtype]["decode_ms"], rows[dtype]["decode_ms"])
            add(f"{dtype} decode >= {want}x rwkv.cpp {PEER_FORMATS[dtype]}",
                f"{r:.2f}x ({rows[dtype]['decode_ms']:.1f} vs {peer[dtype]['decode_ms']:.1f} ms)", r >= want)
    if "int8" in small:
        r = small["int8"]
        floor = r["weight_bytes_per_token"] / (r["bandwidth_gbs"] * 1e9) * 1e3
        add("v7-0.1b int8 decode >= 75% of its roofline",
            f"{100 * floor / r['decode_ms']:.0f}% ({r['decode_ms']:.1f} ms vs floor {floor:.1f} ms at "
            f"{r['bandwidth_gbs']:.1f} GB/s)", floor / r["decode_ms"] >= 0.75)
    faster = [(shape, rs["int4"]["decode_ms"], rs["int8"]["decode_ms"]) for shape, rs in results["models"].items()
              if "int4" in rs and "int8" in rs]
    if faster:
        add("int4 decode faster than int8 at every shape",
            ", ".join(f"{shape} {a:.1f} vs {b:.1f} ms" for shape, a, b in faster), all(a < b for _, a, b in faster))
    if "int8" in rows and "int8" in peer:
        r = _ratio(rows["int8"]["prefill_tok_s"], peer["int8"]["prefill_tok_s"])
        add("512-token prefill in int8 >= 3x rwkv.cpp Q8_0",
            f"{r:.2f}x ({rows['int8']['prefill_tok_s']:.0f} vs {peer['int8']['prefill_tok_s']:.0f} tokens/s)", r >= 3)
    blocks = results.get("blocks", {}).get("blocks")
    if blocks:
        fwd = {int(k): v for k, v in blocks["forward"].items()}
        step = {int(k): v for k, v in blocks.get("step", {}).items()}
        add("8 prompt tokens <= 1.6x one token (int8)", f"{fwd[8] / fwd[1]:.2f}x ({fwd[8]:.1f} vs {fwd[1]:.1f} ms)",
            fwd[8] / fwd[1] <= 1.6)
        if 8 in step and 1 in step:
            add("8 sequences' step <= 1.6x one sequence's (int8)",
                f"{step[8] / step[1]:.2f}x ({step[8]:.1f} vs {step[1]:.1f} ms)", step[8] / step[1] <= 1.6)
    start = results.get("startup")
    if start:
        add("cold first start of `rwkvcpu generate` (shipped model) <= 2.5 s", f"{start['cold_s']:.2f} s",
            start["cold_s"] <= 2.5)
        add("warm start <= 0.8 s", f"{start['warm_s']:.2f} s", start["warm_s"] <= 0.8)
    return out + [""]


def speed_sections(results: dict) -> list:
    """Block costs, the per-kernel profile and start-up times."""
    out = []
    b = results.get("blocks")
    if b:
        fwd = {int(k): v for k, v in b["blocks"]["forward"].items()}
        step = {int(k): v for k, v in b["blocks"].get("step", {}).items()}
        out += ["## Blocks of tokens", "",
                f"{TARGET_SHAPE} int8, {results.get('threads', '')} threads (`python benchmarks/bench_blocks.py`): "
                "a call of `forward` with T tokens of one sequence, and of `step` with T sequences of one token "
                f"each (median ms; busy {100 * b['busy']:.0f}%).", "",
                "| T | one sequence, T tokens: ms | vs T = 1 | T sequences, 1 token each: ms | vs 1 sequence |",
                "| ---: | ---: | ---: | ---: | ---: |"]
        for T, ms in fwd.items():
            s = step.get(T)
            out.append(f"| {T} | {ms:.2f} | {ms / fwd[1]:.2f}x | {'' if s is None else f'{s:.2f}'} | "
                       f"{'' if s is None else f'{s / step[1]:.2f}x'} |")
        out += ["", "Where the time goes, ms per call (the generation's calls wrapped with timers; 'python and "
                "dispatch' is the rest of the call):", ""]
        prof = {int(k): v for k, v in b.get("profile", {}).items()}
        names = list(dict.fromkeys(k for p in prof.values() for k in p["ms"]))
        out += ["| kernel | " + " | ".join(f"T = {T}" for T in prof) + " |",
                "| --- | " + " | ".join("---:" for _ in prof) + " |"]
        for name in names:
            out.append(f"| {name} | " + " | ".join(f"{p['ms'].get(name, 0):.2f}" for p in prof.values()) + " |")
        out.append("| total | " + " | ".join(f"{p['total']:.2f}" for p in prof.values()) + " |")
        out.append("")
    start = results.get("startup")
    if start:
        out += ["## First start", "",
                f"`{start['command']}` in a fresh process, from its start to its exit (median of {start['runs']}): "
                "cold with numba's kernel cache empty (every kernel the first token needs is compiled), warm "
                "with the cache that run filled.", "",
                "| numba cache | seconds |", "| --- | ---: |",
                f"| cold | {start['cold_s']:.2f} |", f"| warm | {start['warm_s']:.2f} |", ""]
    return out


def peer_notes(results: dict) -> list:
    if not results.get("peer"):
        return []
    info = results.get("peer_info", {})
    return [
        f"- **rwkv.cpp.** {PEER_SOURCE}, outside this repository (`--rwkv-cpp DIR`); its CPU features: "
        f"{info.get('system_info', '?')}. Its files come from the same .pth through its own converter and "
        "quantizer (layer 0's unused v0/v1/v2 dropped, which its loader rejects); it keeps the embedding and the "
        "head in FP16 in every format and the low-rank matrices in FP16. Timed by benchmarks/rwkvcpp_worker.py: "
        "`rwkv_eval` one token at a time, a prompt with `rwkv_eval_sequence_in_chunks` (chunks of 64), at the "
        "same threads. Each pair of rows was measured alternately, ours then rwkv.cpp's, "
        f"{info.get('rounds', 1)} times; each side keeps its fastest decode and prefill. Its rows' roofline "
        "counts its file less the embedding.",
    ]


def _rss_bound(results: dict, rows: dict) -> str:
    """What bounds the peak RSS: the runtime's own memory, measured on the per-token overhead model."""
    base = [results["overhead"][d]["peak_rss_bytes"] for d in DTYPES
            if isinstance(results.get("overhead", {}).get(d), dict) and "peak_rss_bytes" in results["overhead"][d]]
    if not base:
        return "the process itself (Python, numpy, numba/LLVM, BLAS) before any weight"
    runtime = max(base)
    net = ", ".join(f"{d} {100 * (rows[d]['peak_rss_bytes'] - runtime) / rows[d]['file_bytes']:.0f}%"
                    for d in DTYPES if d in rows)
    return (f"a process running a model of 1-3 MB already peaks at {runtime / 1e6:.0f} MB (Python, numpy, "
            f"numba's LLVM and BLAS libraries mapped, work buffers); above that: {net} of the file")


def targets(results: dict) -> list:
    rows = results["models"].get(TARGET_SHAPE)
    if not rows or "int8" not in rows:
        return []
    i8, i4, f32, ref = rows.get("int8"), rows.get("int4"), rows.get("fp32"), rows.get("reference")
    floor8 = i8["weight_bytes_per_token"] / (i8["bandwidth_gbs"] * 1e9) * 1e3
    out = [f"## Targets ({TARGET_SHAPE}, ratios from this run)", "",
           "The last column is what the memory allows: for a speed-up, the reference's decode time over the "
           "row's roofline (no implementation can decode faster than its weights stream in).", "",
           "| target | measured | met | bound at the measured bandwidth |", "| --- | --- | --- | --- |"]

    def add(name, value, ok, bound=""):
        out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} | {bound} |")

    def ceiling(row):
        return ref["decode_ms"] / (row["weight_bytes_per_token"] / (row["bandwidth_gbs"] * 1e9) * 1e3)

    add("int8 decode >= 80% of the bandwidth roofline", f"{100 * floor8 / i8['decode_ms']:.0f}% "
        f"({i8['decode_ms']:.1f} ms vs floor {floor8:.1f} ms at {i8['bandwidth_gbs']:.1f} GB/s)",
        floor8 / i8["decode_ms"] >= 0.8,
        f"80% needs {floor8 / 0.8:.1f} ms; {i8['decode_ms'] - floor8:.1f} ms/token go to work between weight "
        "reads: Python and dispatch (see the overhead table, twice the layers here), the recurrence and "
        "elementwise kernels, thread wake-ups")
    if i4:
        add("int4 decode faster than int8", f"{i4['decode_ms']:.1f} vs {i8['decode_ms']:.1f} ms",
            i4["decode_ms"] < i8["decode_ms"])
    if ref:
        add("fp32 decode >= 2x the reference (fp32)", f"{ref['decode_ms'] / f32['decode_ms']:.1f}x",
            ref["decode_ms"] / f32["decode_ms"] >= 2, f"at most {ceiling(f32):.1f}x at {f32['bandwidth_gbs']:.1f} GB/s")
        add("int8 decode >= 7x the reference (fp32)", f"{ref['decode_ms'] / i8['decode_ms']:.1f}x",
            ref["decode_ms"] / i8["decode_ms"] >= 7, f"at most {ceiling(i8):.1f}x at {i8['bandwidth_gbs']:.1f} GB/s")
    add("512-token prefill >= 150 tokens/s in int8", f"{i8['prefill_tok_s']:.0f} tokens/s", i8["prefill_tok_s"] >= 150)
    add("load <= 1 s (mmap)", ", ".join(f"{d} {rows[d]['load_s']:.2f} s" for d in DTYPES if d in rows),
        all(rows[d]["load_s"] <= 1 for d in DTYPES if d in rows))
    add("peak RSS <= file size + 15%", ", ".join(
        f"{d} {100 * rows[d]['peak_rss_bytes'] / rows[d]['file_bytes']:.0f}%" for d in DTYPES if d in rows),
        all(rows[d]["peak_rss_bytes"] <= 1.15 * rows[d]["file_bytes"] for d in DTYPES if d in rows),
        _rss_bound(results, rows))
    return out


NOTES = [
    "## How the figures come about",
    "",
    "- **Kernels.** int8 and int4 products quantize each token's activations to int8 per weight group "
    "(scale max|x| / 127), so that each group's dot product is exact integer arithmetic on the CPU's widest "
    "integer multiply-add: `vpdpbusd` on 512-bit vectors with AVX-512 VNNI (64 products per instruction), on "
    "256-bit ones with AVX-VNNI, `vpmaddubsw` + `vpmaddwd` on AVX2, chosen from numba's target features "
    "(`rwkvcpu/kernels/isa.py`, `idot.py`, `qmatmul.py`). Every (row, token) adds its groups in one canonical "
    "float order, so every CPU path, and a token alone or in a block, gives the same bits "
    "(tests/test_kernels_qmatmul.py, with an AVX2-only compile and the instructions checked in the assembly). "
    "Blocks of up to 4 tokens read each weight row once and multiply it with each token in turn; larger "
    "blocks use tiles of 8 tokens (each 4-byte weight word broadcast to the 8 token lanes of one "
    "`vpdpbusd`). fp32/fp16 use LLVM's own vectorisation (`vfmadd231ps`, `vcvtph2ps`). The activation "
    "rounding moves each x by at most max|x over its group| / 254 (bound tested).",
    "- **Prefill.** Each weight matrix is one product per block of tokens. int8/int4 matrices (and fp32/fp16 "
    "ones under 1 MB) use the kernels above, so a prompt and the same tokens fed one by one give identical "
    "logits; larger fp32/fp16 matrices take BLAS, their rows split into one block per thread, each thread "
    "dequantizing ~1 MB tiles into float32.",
    "- **Quantization on random weights.** The KL column depends on how a model amplifies small changes of "
    "its weights, and random weights are no trained model: v6-1.6b turns even fp16's 0.02% weight rounding "
    "into logit changes of 0.2 (KL 2e-4) where v7-0.4b's stay under 0.01. "
    "`python benchmarks/quant_sensitivity.py v6-1.6b` shows the int8 KL (8.9e-2 over 24 tokens) is the "
    "weights' own rounding: fp32 kernels on the dequantized int8 weights score the same 8.9e-2, and the int8 "
    "kernels add a KL of 1e-4 to them (v7-0.4b: 4.5e-4 either way, the kernels adding 1e-8). On trained "
    "models int8's KL measures 6e-6..5e-4 on the tiny fixtures (bounded in tests/test_quality_quant.py), and "
    "the shipped model's perplexity over the first 100,000 tokens of dev.txt moves from 25.620 (fp32) to "
    "25.623 (int8, +0.011%).",
    "- **Threads.** BLAS is capped at one thread (threadpoolctl) and GEMMs are split by rwkvcpu's own workers, "
    "which sleep when idle; numba's OpenMP workers spin at most GOMP_SPINCOUNT=20000 polls before sleeping "
    "(the default, 300000, kept them spinning for milliseconds into the next phase). So at most `threads` "
    "threads compute at any moment.",
    "- **Roofline.** Bytes of every tensor a decode step reads (all but one row of the embedding), divided by "
    "the bandwidth of the same moments: `rwkvcpu bench` streams exactly those bytes of the model's own mapping "
    "of the file, with the same threads, before, every 50 tokens during and after the timed decode steps "
    "(the median counts; the range is in results.json). This host's bandwidth swings between ~30 and ~55 GB/s "
    "from one minute to the next with what else runs on it, which is why no single figure serves every row. "
    "The roofline leaves out the recurrent state (read and written every token; 6 MB for v7-0.4b) and the "
    "Python work between kernels. The reference row uses a 512 MB buffer's bandwidth, measured right after it.",
    "- **Machine load.** This machine is shared; 'busy' is the share of all cores that other processes used "
    "while a row was measured (the least disturbed of up to 3 tries). Rows measured while it was busy are "
    "slower than the machine allows.",
]


# ------------------------------------------------------------------ main

def enough_room(work: Path, shape) -> str:
    """Why a shape cannot be run here ("" when it can): its fp32 copy must fit in free memory twice
    over (the reference holds fp32 weights and the mapped bf16 file) and all files on disk."""
    gen, layers, width, vocab = shape
    params = layers * 12 * width * width + 2 * vocab * width
    with open("/proc/meminfo") as f:
        avail = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}.get("MemAvailable", 0)
    need_mem = 2.5 * 4 * params
    need_disk = (2 + 4 + 2 + 1.05 + 0.65) * params
    if avail < need_mem:
        return f"needs ~{need_mem / 1e9:.0f} GB of free memory, {avail / 1e9:.0f} GB available"
    if shutil.disk_usage(work).free < need_disk:
        return f"needs ~{need_disk / 1e9:.0f} GB of disk in {work}"
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--tokens", type=int, default=200, help="decode steps timed per model")
    ap.add_argument("--prompt", type=int, default=512, help="prompt length for prefill")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "rwkvcpu-bench"),
                    help="where the models are written (kept between runs)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--no-reference", action="store_true", help="skip the reference package")
    ap.add_argument("--rwkv-cpp", metavar="DIR", help="also time rwkv.cpp, built by hand in DIR (see rwkvcpp_worker.py)")
    ap.add_argument("--rounds", type=int, default=2, help="with --rwkv-cpp: alternate ours and rwkv.cpp's this often")
    ap.add_argument("--from-json", metavar="JSON", help="only rewrite --out from a run's .json")
    ap.add_argument("--kl-worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        info = saved.pop("machine")
        saved["census"] = {int(k): v for k, v in saved.get("census", {}).items()}
        saved["bandwidth"] = [{int(k) if k.isdigit() else k: v for k, v in b.items()} for b in saved["bandwidth"]]
        args.threads = args.threads or max(k for k in saved["bandwidth"][0] if isinstance(k, int))
        write_results(Path(args.out), report(saved, info, args, 0.0))
        return
    if args.kl_worker:
        tokens = [int(t) for t in args.kl_worker[0].split(",")]
        print(json.dumps(kl_worker(args.kl_worker[1:], tokens)))
        return

    from rwkvcpu.threads import physical_cores
    args.threads = args.threads or physical_cores()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    info = machine()
    log(f"machine: {info.get('cpu')}, {args.threads} threads")
    results = {"bandwidth": [], "models": {}, "skipped": {}, "peer": {}, "threads": args.threads}
    results["bandwidth"].append(bandwidth(args.threads))
    log(f"bandwidth: {results['bandwidth'][0][args.threads] / 1e9:.1f} GB/s")

    log("warming numba's kernel cache; per-token overhead (tiny v7)")
    results["overhead"] = python_overhead(work, args.threads, args.tokens)

    for name in args.shapes.split(","):
        shape = SHAPES[name]
        why = enough_room(work, shape)
        if why:
            results["skipped"][name] = why
            log(f"{name}: skipped: {why}")
            continue
        log(f"{name}: models")
        paths = make_models(work, name, shape, log)
        rows = results["models"][name] = {}
        peer_paths = make_peer_models(args.rwkv_cpp, work, name, paths["pth"], log) if args.rwkv_cpp else {}
        peer = results["peer"].setdefault(name, {}) if args.rwkv_cpp else {}
        for _ in range(args.rounds if args.rwkv_cpp else 1):
            for dtype in DTYPES:
                r = measured(_bench_cmd(paths[dtype], args.threads, args.tokens, args.prompt))
                _keep_best(rows, dtype, r)
                log(f"{name} {dtype}: decode {r['decode_ms']:.1f} ms ({r['bandwidth_gbs']:.1f} GB/s), prefill "
                    f"{r['prefill_tok_s']:.0f} tok/s, load {r['load_s']:.2f} s (busy {100 * r['busy']:.0f}%)")
                if dtype in peer_paths:
                    p = measured(_peer_cmd(args.rwkv_cpp, peer_paths[dtype], args.threads, args.tokens, args.prompt))
                    p["bandwidth_gbs"] = bandwidth(args.threads)[args.threads] / 1e9
                    results["peer_info"] = {"system_info": p.pop("system_info", "?"), "rounds": args.rounds}
                    _keep_best(peer, dtype, p)
                    log(f"{name} rwkv.cpp {PEER_FORMATS[dtype]}: decode {p['decode_ms']:.1f} ms, prefill "
                        f"{p['prefill_tok_s']:.0f} tok/s (busy {100 * p['busy']:.0f}%)")
        if not args.no_reference:
            env = dict(os.environ, RWKV_V7_ON="1" if shape[0] == "v7" else "0", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
            ref = measured([sys.executable, str(HERE / "reference_worker.py"), str(paths["pth"]),
                            "--threads", str(args.threads), "--tokens", str(args.tokens),
                            "--prompt", str(args.prompt)], env=env)
            rows["reference"] = ref | {"bandwidth_gbs": bandwidth(args.threads)[args.threads] / 1e9}
            log(f"{name} reference: decode {ref['decode_ms']:.1f} ms, prefill {ref['prefill_tok_s']:.0f} tok/s")
        tokens = np.random.default_rng(2).integers(0, shape[3], KL_TOKENS).tolist()
        kl, _ = run_json([sys.executable, __file__, "--kl-worker", ",".join(map(str, tokens)),
                          *[str(paths[d]) for d in DTYPES]])
        rows["kl"] = {d: kl[str(paths[d])] for d in DTYPES[1:]}
        log(f"{name} KL vs fp32: " + ", ".join(f"{d} {rows['kl'][d]['kl']:.2e}" for d in DTYPES[1:]))
        if name == TARGET_SHAPE:
            results["blocks"] = blocks_worker(paths["int8"], args.threads)
            log("blocks: " + ", ".join(f"T={T} {ms:.1f} ms" for T, ms in results["blocks"]["blocks"]["forward"].items()))
            results["census"] = thread_census(paths["int8"], args.threads)
            log("threads running at once (share of samples): " + ", ".join(
                f"{k}: {100 * v:.1f}%" for k, v in results["census"].items()))
        # Write as we go: a long run that fails late still leaves its numbers.
        write_results(Path(args.out), report(results, info, args, time.perf_counter() - t_start))

    from bench_startup import generate_start
    results["startup"] = generate_start(runs=3)
    log(f"first start: cold {results['startup']['cold_s']:.2f} s, warm {results['startup']['warm_s']:.2f} s")
    results["bandwidth"].append(bandwidth(args.threads))
    write_results(Path(args.out), report(results, info, args, time.perf_counter() - t_start))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"machine": info, **results}, indent=1, default=str))
    # (report() recorded the command, date and duration in results["run"] above.)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
