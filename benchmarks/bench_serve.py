"""The server through HTTP: aggregate tokens/s at 1..16 concurrent streams, time to first token and
inter-token latency, a cached 2,000-token prefix, and HTTP + scheduling overhead against model.generate.

    python benchmarks/bench_serve.py                           # v7-0.1b and v7-0.4b int8, into RESULTS.md
    python benchmarks/bench_serve.py --shapes v7-0.1b --streams 1,4 --tokens 16 --out /tmp/s.md   # a quick look

Random weights at the official shapes (benchmarks/bench_models.py makes them, int8). For each
shape a fresh `rwkvcpu serve` process runs with --max-batch 16 and the default prefill budget;
the official `openai` client streams completions from it (end-of-text banned, so every stream
generates exactly --tokens tokens; temperature 1, top_p 0.9).

The machine is shared, and other people's work can take most of it for minutes: each row waits
(at most 30 s) for quiet CPUs, is run --repeats times keeping the fastest, and records the CPU
share other processes took meanwhile ("busy"). The overhead of HTTP and scheduling is measured
by alternating the two contenders (model.generate in this process, one HTTP stream) several
times, so that both see the same load; compare its ratios, not its absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_models import SHAPES, Busy, machine, make_models, replace_section
from bench_models import wait_for_quiet as _wait_for_quiet

HERE = Path(__file__).resolve().parent
SERVE_SHAPES = ("v7-0.1b", "v7-0.4b")
SAMPLING = dict(temperature=1.0, top_p=0.9, presence_penalty=0.0, frequency_penalty=0.0)
NO_EOS = {"0": -100}
PROMPT_TOKENS = 32
PREFIX_TOKENS = 2000
# Rounds of the alternating overhead measurement.
ROUNDS = 6


def wait_for_quiet():
    _wait_for_quiet(limit=30.0)


def percentile(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def start_server(path: Path, threads: int, max_batch: int):
    cmd = [sys.executable, "-m", "rwkvcpu.cli.main", "serve", str(path), "--port", "0", "--threads", str(threads),
           "--max-batch", str(max_batch), "--max-queue", "256", "--model-name", "m"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"{' '.join(cmd)} did not start")
        if "serving" in line:
            return proc, line.split(" at ", 1)[1].split("/v1", 1)[0]


async def streams(url: str, prompts: list, tokens: int) -> dict:
    """len(prompts) concurrent streaming completions; aggregate tokens/s, TTFT and inter-token gaps."""
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=3600)
    ttft, gaps = [], []

    async def one(prompt):
        t0 = time.perf_counter()
        last = None
        stream = await client.completions.create(model="m", prompt=prompt, max_tokens=tokens, stream=True,
                                                 logit_bias=NO_EOS, **SAMPLING)
        async for chunk in stream:
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            (ttft if last is None else gaps).append(now - (t0 if last is None else last))
            last = now
        return last

    t0 = time.perf_counter()
    ends = await asyncio.gather(*(one(p) for p in prompts))
    wall = max(ends) - t0
    await client.close()
    return {"streams": len(prompts), "wall_s": wall, "tok_s": len(prompts) * tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99)}


async def cached_prefix(url: str, prefix: list, tail: list) -> dict:
    """TTFT of prefix + tail, with the prefix cached (asked once before) and without (a fresh prefix)."""
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=3600)

    async def ttft(prompt):
        t0 = time.perf_counter()
        r = await client.completions.create(model="m", prompt=prompt, max_tokens=1, logit_bias=NO_EOS, **SAMPLING)
        return time.perf_counter() - t0, r.usage.prompt_tokens_details.cached_tokens

    await ttft(prefix)                                      # the prefix's state goes to the cache
    warm, cached = await ttft(prefix + tail)
    fresh_prefix = [(t + 1) % 60000 for t in prefix]
    cold, _ = await ttft(fresh_prefix + tail)
    await client.close()
    return {"cached_ttft_ms": 1e3 * warm, "cached_tokens": cached, "uncached_ttft_ms": 1e3 * cold,
            "tail_tokens": len(tail)}


def overhead(url: str, path: Path, threads: int, prompt: list, tokens: int) -> dict:
    """ms per token of model.generate (in this process) and of one HTTP stream, alternately ROUNDS times."""
    import openai
    import rwkvcpu
    model = rwkvcpu.load(path, threads=threads)
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=3600)

    def library():
        t0 = time.perf_counter()
        list(model.generate(prompt, max_tokens=tokens, logit_bias={0: -100.0}, seed=1, **SAMPLING))
        return (time.perf_counter() - t0) / tokens

    def http():
        t0 = time.perf_counter()
        for _ in client.completions.create(model="m", prompt=prompt, max_tokens=tokens, stream=True, seed=1,
                                           logit_bias=NO_EOS, **SAMPLING):
            pass
        return (time.perf_counter() - t0) / tokens

    library(), http()                                       # warm-up
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(library())
        b.append(http())
    return {"generate_ms": [1e3 * x for x in a], "http_ms": [1e3 * x for x in b]}


def tree_cpu_seconds(root: int) -> float:
    """CPU time used so far by `root` and every process under it (Ray's processes included)."""
    table = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else None
        except OSError:
            continue
        if stat:
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    total, frontier, seen = 0, [root], set()
    while frontier:
        pid = frontier.pop()
        seen.add(pid)
        total += table.get(pid, (0, 0))[1]
        frontier += [p for p, (ppid, _) in table.items() if ppid == pid and p not in seen]
    return total / os.sysconf("SC_CLK_TCK")


class ServerBusy(Busy):
    """Busy, less the server's process tree: the CPU share processes outside this benchmark took."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid

    def __enter__(self):
        self.tree0 = tree_cpu_seconds(self.server_pid)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        wall = time.perf_counter() - self.t0
        tree = tree_cpu_seconds(self.server_pid) - self.tree0
        self.share = max(0.0, self.share - tree / (wall * os.cpu_count()))


STEP_COSTS = """
import json, time
import numpy as np
import rwkvcpu
m = rwkvcpu.load({path!r}, threads={threads})
pool = m.state_pool(17)
slots = [pool.acquire() for _ in range(17)]
rng = np.random.default_rng(0)
V = m.config.vocab_size
def ms(batch, reps=5):
    m.step(pool, batch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        m.step(pool, batch)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)
out = {{"decode": {{}}, "with_prefill": {{}}}}
for b in {batches!r}:
    out["decode"][b] = ms([(s, [int(rng.integers(V))]) for s in slots[:b]])
four = [(s, [int(rng.integers(V))]) for s in slots[:4]]
for c in {chunks!r}:
    out["with_prefill"][c] = ms(four + [(slots[16], rng.integers(0, V, c).tolist())])
print(json.dumps(out))
"""
BATCHES = (1, 2, 4, 8, 16)
CHUNKS = (16, 32, 64, 128, 256)


def step_costs(path: Path, threads: int) -> dict:
    """Model.step alone (no HTTP): decode steps of 1..16 sequences, and 4 decoding sequences plus a prompt
    chunk of 16..256 tokens - what --max-batch and --prefill-budget trade (best of 5, fresh process)."""
    code = STEP_COSTS.format(path=str(path), threads=threads, batches=BATCHES, chunks=CHUNKS)
    with Busy() as busy:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: {int(n): ms for n, ms in v.items()} for k, v in r.items()} | {"busy": busy.share}


def bench_shape(name, path, args, log) -> dict:
    vocab = SHAPES[name][3]
    rng = np.random.default_rng(1)
    row = {"levels": []}
    wait_for_quiet()
    row["steps"] = step_costs(path, args.threads)
    log(f"{name}: decode step ms by batch " + ", ".join(f"{b}: {v:.0f}" for b, v in row["steps"]["decode"].items())
        + "; 4 decoding + a prompt chunk: " + ", ".join(f"{c}: {v:.0f}" for c, v in
                                                       row["steps"]["with_prefill"].items()))
    proc, url = start_server(path, args.threads, max(args.streams))
    try:
        # warm-up: compile (or load from numba's cache) every kernel the server uses
        asyncio.run(streams(url, [rng.integers(1, vocab, PROMPT_TOKENS).tolist()], 4))
        for s in args.streams:
            best = None
            for _ in range(args.repeats):
                wait_for_quiet()
                prompts = [rng.integers(1, vocab, PROMPT_TOKENS).tolist() for _ in range(s)]
                with ServerBusy(proc.pid) as busy:
                    r = asyncio.run(streams(url, prompts, args.tokens))
                r["busy"] = busy.share
                if best is None or r["tok_s"] > best["tok_s"]:
                    best = r
            row["levels"].append(best)
            log(f"{name}: {s} streams {best['tok_s']:.1f} tok/s, TTFT p50 {best['ttft_p50_ms']:.0f} ms, "
                f"ITL p50 {best['itl_p50_ms']:.0f} ms p99 {best['itl_p99_ms']:.0f} ms (busy {100 * best['busy']:.0f}%)")
        wait_for_quiet()
        prefix = rng.integers(1, vocab, PREFIX_TOKENS).tolist()
        tail = rng.integers(1, vocab, 16).tolist()
        row["prefix"] = asyncio.run(cached_prefix(url, prefix, tail))
        log(f"{name}: TTFT with a cached {PREFIX_TOKENS}-token prefix {row['prefix']['cached_ttft_ms']:.0f} ms "
            f"(uncached {row['prefix']['uncached_ttft_ms']:.0f} ms)")
        wait_for_quiet()
        with ServerBusy(proc.pid) as busy:
            row["overhead"] = overhead(url, path, args.threads, rng.integers(1, vocab, PROMPT_TOKENS).tolist(),
                                       args.tokens)
        row["overhead"]["busy"] = busy.share
        o = row["overhead"]
        log(f"{name}: model.generate {min(o['generate_ms']):.1f} ms/token, one HTTP stream "
            f"{min(o['http_ms']):.1f} ms/token (best of {ROUNDS} alternating)")
    finally:
        proc.terminate()
        proc.wait(60)
    return row


def report(results: dict, info: dict) -> str:
    runs = "; ".join(f"{name}: `{row['command']}` on {row['date']} ({row['tokens']} tokens per stream, best of "
                     f"{row['repeats']})" for name, row in results["shapes"].items())
    lines = [
        f"Written by {runs}. CPU: {info.get('cpu', '?')}, {info.get('physical_cores', '?')} cores. Random int8 "
        "weights at the official shapes; one `rwkvcpu serve --max-batch 16` process per shape (default prefill "
        f"budget), the `openai` client streaming completions from {PROMPT_TOKENS}-token prompts (temperature 1, "
        "top_p 0.9, end-of-text banned). tok/s: all streams' tokens over the wall time from the first request to "
        "the last token, the best of the runs. TTFT: request sent to first token. ITL: gap between a stream's "
        "consecutive tokens. busy: CPU share other processes took meanwhile (the machine is shared: compare "
        "ratios within a shape, and read the busy column before any absolute figure).",
        "",
        "| shape | streams | aggregate tok/s | vs 1 stream | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["shapes"].items():
        base = row["levels"][0]["tok_s"]
        for r in row["levels"]:
            lines.append(f"| {name} | {r['streams']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
                         f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} | "
                         f"{r['itl_p99_ms']:.0f} | {100 * r['busy']:.0f}% |")
    lines += ["", "Overhead of HTTP + scheduling at 1 stream: `model.generate` (in the benchmark's process) and one "
              "HTTP stream from the server, the same prompt, sampling and tokens, alternated "
              f"{ROUNDS} times; ms per token including the prompt, best and median.", "",
              "| shape | TTFT, cached 2,000-token prefix + 16 tokens | uncached | 1-stream ITL p50 | "
              "model.generate ms/token (best, median) | HTTP stream ms/token (best, median) | overhead (best) | busy |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in results["shapes"].items():
        p, one, o = row["prefix"], row["levels"][0], row["overhead"]
        g, h = o["generate_ms"], o["http_ms"]
        lines.append(f"| {name} | {p['cached_ttft_ms']:.0f} ms ({p['cached_tokens']} tokens cached) | "
                     f"{p['uncached_ttft_ms']:.0f} ms | {one['itl_p50_ms']:.0f} ms | "
                     f"{min(g):.1f}, {np.median(g):.1f} | {min(h):.1f}, {np.median(h):.1f} | "
                     f"{100 * (min(h) / min(g) - 1):+.0f}% | {100 * o['busy']:.0f}% |")
    lines += ["", "What the defaults rest on: `Model.step` alone (no HTTP; best of 5 steps in a fresh process). "
              "decode: one step of B sequences decoding one token each. +chunk: 4 decoding sequences and one "
              "prompt chunk of c tokens in the same step (the streams' inter-token time while a prompt is read), "
              "and in brackets the prompt tokens/s the chunk adds.", "",
              "| shape | " + " | ".join(f"decode B={b} ms" for b in BATCHES) + " | "
              + " | ".join(f"+chunk {c} ms (tok/s)" for c in CHUNKS) + " | busy |",
              "| --- | " + " | ".join("---:" for _ in BATCHES + CHUNKS) + " | ---: |"]
    for name, row in results["shapes"].items():
        st = row["steps"]
        four = st["decode"][4]
        # (a chunk "faster" than no chunk: the machine's load moved between the two; no rate then)
        cells = [f"{st['decode'][b]:.1f}" for b in BATCHES] + [
            f"{st['with_prefill'][c]:.1f} ({c / (st['with_prefill'][c] - four) * 1e3:.0f})"
            if st['with_prefill'][c] > four else f"{st['with_prefill'][c]:.1f} (-)" for c in CHUNKS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * st['busy']:.0f}% |")
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SERVE_SHAPES))
    ap.add_argument("--streams", default="1,2,4,8,16", help="concurrent streams, comma-separated (first: 1)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    ap.add_argument("--repeats", type=int, default=2, help="runs per number of streams (the fastest counts)")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "rwkvcpu-bench"),
                    help="where the models are written (kept between runs)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite --out from its -serve.json")
    ap.add_argument("--note", help="a paragraph on the run's conditions, printed under the tables")
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    from rwkvcpu.threads import physical_cores
    args.threads = args.threads or physical_cores()
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    # Shapes measured by earlier runs keep their rows (each says which command measured it).
    saved = Path(args.out).with_name(Path(args.out).stem + "-serve.json")
    results = json.loads(saved.read_text()) if saved.exists() else {"shapes": {}}
    for row in results["shapes"].values():
        # JSON's keys are strings: the step table's are batch sizes and chunk lengths
        row["steps"] = {k: v if k == "busy" else {int(n): ms for n, ms in v.items()} for k, v in row["steps"].items()}
    if args.note:
        results["note"] = args.note
        saved.write_text(json.dumps(results, indent=1))
    if args.report_only:
        replace_section(Path(args.out), "Serving (benchmarks/bench_serve.py)", report(results, info))
        return
    for name in args.shapes.split(","):
        paths = make_models(work, name, SHAPES[name], log, dtypes=("int8",), keep_pth=False)
        row = bench_shape(name, paths["int8"], args, log)
        row.update(command=" ".join(["python benchmarks/bench_serve.py", *sys.argv[1:]]),
                   date=time.strftime("%Y-%m-%d %H:%M"), tokens=args.tokens, repeats=args.repeats)
        results["shapes"][name] = row
        saved.write_text(json.dumps(results, indent=1))
        replace_section(Path(args.out), "Serving (benchmarks/bench_serve.py)", report(results, info))
    log(f"wrote {args.out} and {saved}")


if __name__ == "__main__":
    main()
