"""The server through HTTP: aggregate tokens/s at 1..16 concurrent streams, time to first token and
inter-token latency, a cached 2,000-token prefix, and HTTP + scheduling overhead against model.generate.

    python benchmarks/bench_serve.py                           # v7-0.1b and v7-0.4b int8, into RESULTS.md
    python benchmarks/bench_serve.py --shapes v7-0.1b --streams 1,4 --tokens 16 --out /tmp/s.md   # a quick look

Random weights at the official shapes (benchmarks/bench_models.py makes them, int8). For each
shape a fresh `rwkvcpu serve` process runs with --max-batch 16 and the default prefill budget;
the official `openai` client streams completions from it (end-of-text banned, so every stream
generates exactly --tokens tokens; temperature 1, top_p 0.9). The machine is shared: each row
waits for quiet CPUs first and records the share other processes took while it ran ("busy").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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


def wait_for_quiet():
    # at most 30 s: on a machine that other people keep busy, a row records how busy it was instead
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
    ttft, gaps, counts, rates = [], [], [], []

    async def one(prompt):
        t0 = time.perf_counter()
        first = last = None
        n = 0
        stream = await client.completions.create(model="m", prompt=prompt, max_tokens=tokens, stream=True,
                                                 logit_bias=NO_EOS, **SAMPLING)
        async for chunk in stream:
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            if last is None:
                first = now
                ttft.append(now - t0)
            else:
                gaps.append(now - last)
            last = now
            n += 1
        counts.append(n)
        if n > 1:
            rates.append((n - 1) / (last - first))
        return last

    t0 = time.perf_counter()
    ends = await asyncio.gather(*(one(p) for p in prompts))
    wall = max(ends) - t0
    await client.close()
    return {"streams": len(prompts), "chunks": sum(counts), "wall_s": wall,
            "tok_s": len(prompts) * tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
            # a stream's own rate once its first token is out (at 1 stream: against model.generate)
            "decode_tok_s": statistics.median(rates) if rates else 0.0}


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


def generate_rate(path: Path, threads: int, prompt: list, tokens: int) -> dict:
    """model.generate in this process's child: decode tokens/s after the first token (same sampling)."""
    code = f"""
import json, time, rwkvcpu
m = rwkvcpu.load({str(path)!r}, threads={threads})
kw = dict(max_tokens={tokens}, logit_bias={{0: -100.0}}, seed=1, **{SAMPLING!r})
list(m.generate({prompt!r}, **kw))          # warm-up
rates = []
for _ in range(2):
    g = m.generate({prompt!r}, **kw)
    next(g)                                   # the prompt and the first token
    t0, k = time.perf_counter(), len(g.tokens)
    for _ in g:
        pass
    rates.append((len(g.tokens) - k) / (time.perf_counter() - t0))
print(json.dumps({{"decode_tok_s": max(rates)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_shape(name, path, args, log) -> dict:
    vocab = SHAPES[name][3]
    rng = np.random.default_rng(1)
    row = {"levels": []}
    wait_for_quiet()
    proc, url = start_server(path, args.threads, max(args.streams))
    try:
        # warm-up: compile (or load from numba's cache) every kernel the server uses
        asyncio.run(streams(url, [rng.integers(1, vocab, PROMPT_TOKENS).tolist()], 4))
        for s in args.streams:
            wait_for_quiet()
            prompts = [rng.integers(1, vocab, PROMPT_TOKENS).tolist() for _ in range(s)]
            with Busy() as busy:
                r = asyncio.run(streams(url, prompts, args.tokens))
            r["busy"] = busy.share
            row["levels"].append(r)
            log(f"{name}: {s} streams {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                f"ITL p50 {r['itl_p50_ms']:.0f} ms p99 {r['itl_p99_ms']:.0f} ms (busy {100 * busy.share:.0f}%)")
        wait_for_quiet()
        prefix = rng.integers(1, vocab, PREFIX_TOKENS).tolist()
        tail = rng.integers(1, vocab, 16).tolist()
        row["prefix"] = asyncio.run(cached_prefix(url, prefix, tail))
        log(f"{name}: TTFT with a cached {PREFIX_TOKENS}-token prefix {row['prefix']['cached_ttft_ms']:.0f} ms "
            f"(uncached {row['prefix']['uncached_ttft_ms']:.0f} ms)")
    finally:
        proc.terminate()
        proc.wait(60)
    wait_for_quiet()
    prompt = rng.integers(1, vocab, PROMPT_TOKENS).tolist()
    row["generate"] = generate_rate(path, args.threads, prompt, args.tokens)
    one = row["levels"][0] if row["levels"][0]["streams"] == 1 else None
    if one:
        log(f"{name}: model.generate {row['generate']['decode_tok_s']:.1f} tok/s vs 1 HTTP stream "
            f"{one['decode_tok_s']:.1f} tok/s")
    return row


def report(results: dict, info: dict, args) -> str:
    lines = [
        f"Written by `{results['command']}` on {results['date']}. CPU: {info.get('cpu', '?')}, "
        f"{info.get('physical_cores', '?')} cores, --threads {args.threads}. Random int8 weights at the official "
        f"shapes; one `rwkvcpu serve --max-batch {max(args.streams)}` process per shape (default prefill budget), "
        f"the `openai` client streaming completions of {args.tokens} tokens each from {PROMPT_TOKENS}-token "
        "prompts (temperature 1, top_p 0.9, end-of-text banned). tok/s: all streams' tokens over the wall time "
        "from the first request to the last token. TTFT: request sent to first token. ITL: gap between a "
        "stream's consecutive tokens. busy: CPU share other processes took meanwhile.",
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
    lines += ["", "| shape | TTFT, cached 2,000-token prefix + 16 tokens | uncached | 1-stream ITL p50 | "
              "model.generate tok/s | 1 HTTP stream tok/s | HTTP + scheduling overhead |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in results["shapes"].items():
        p, one, g = row["prefix"], row["levels"][0], row["generate"]["decode_tok_s"]
        over = f"{100 * (g / one['decode_tok_s'] - 1):+.0f}%" if one["streams"] == 1 and one["decode_tok_s"] else ""
        lines.append(f"| {name} | {p['cached_ttft_ms']:.0f} ms ({p['cached_tokens']} tokens cached) | "
                     f"{p['uncached_ttft_ms']:.0f} ms | {one['itl_p50_ms']:.0f} ms | {g:.1f} | "
                     f"{one['decode_tok_s']:.1f} | {over} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SERVE_SHAPES))
    ap.add_argument("--streams", default="1,2,4,8,16", help="concurrent streams, comma-separated (first: 1)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "rwkvcpu-bench"),
                    help="where the models are written (kept between runs)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
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
    results = {"command": " ".join(["python benchmarks/bench_serve.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "shapes": {}}
    for name in args.shapes.split(","):
        paths = make_models(work, name, SHAPES[name], log, dtypes=("int8",), keep_pth=False)
        results["shapes"][name] = bench_shape(name, paths["int8"], args, log)
        replace_section(Path(args.out), "Serving (benchmarks/bench_serve.py)", report(results, info, args))
    print(json.dumps(results, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
