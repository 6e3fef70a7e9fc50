"""Speed figures of one model file, and the machine's memory bandwidth to judge them by.

Decoding one token reads every weight matrix once, so its floor is
(weight bytes read per token) / (memory bandwidth): the roofline. `measure`
reports how close a model gets to it, with the other figures a user cares
about: load time, time to the first token, decode and prompt speed, memory.

Example:
    >>> from rwkvcpu import bench
    >>> r = bench.measure("rwkv7-0.4b-int8.safetensors", decode_tokens=200)
    >>> r["decode_ms"], r["roofline_pct"]
"""

from __future__ import annotations

import os
import resource
import time
from typing import Optional

import numpy as np

# The prompt whose first token `ttft_s` waits for, in tokens.
TTFT_PROMPT = 16
# Most decode steps or prompt tokens one measurement takes (hours of a 0.4B model already).
MAX_TOKENS = 1_000_000
# Weights smaller than this stay in the caches: their bandwidth is not the memory's.
_MIN_STREAM_BYTES = 64 << 20


def memory_bandwidth(threads: Optional[int] = None, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second that `threads` threads read from memory, best of `repeats`.

    A numba kernel sums a float32 buffer far larger than the caches, split into
    one contiguous run of rows per thread (the access pattern of a matvec).

    Args:
        threads: reading threads (None: rwkvcpu.threads.configure's default).
        megabytes: buffer size; it is allocated for the call and freed after.
        repeats: passes over the buffer; the fastest counts.

    Returns:
        bytes per second.
    """
    from . import threads as thread_control
    from .kernels.stream import read_rows

    thread_control.configure(threads)
    rows = 1024
    a = np.ones((rows, megabytes * (1 << 20) // (4 * rows)), np.float32)
    out = np.empty(rows, np.float32)
    read_rows(a, out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        read_rows(a, out)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def _token_ranges(path) -> list:
    """(offset, size) of the file regions one decoded token reads: every tensor but the
    embedding, adjacent tensors merged."""
    from .io import read_header

    header, start = read_header(path)
    spans = sorted((start + v["data_offsets"][0], start + v["data_offsets"][1])
                   for k, v in header.items() if k != "__metadata__" and not k.startswith("emb.weight"))
    merged = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in merged]


class WeightStream:
    """Streams the bytes of a model file that one decoded token reads, with the
    same kernel and threads as memory_bandwidth: the bandwidth this process gets
    for exactly those pages (file-backed, as the model maps them), measurable
    between decode steps without allocating anything."""

    _ROW = 1 << 14      # floats per row of the views: 64 KB

    def __init__(self, path, mapping=None):
        """mapping: the model's own mapping of the file (a buffer), if at hand; a second
        mapping of the same pages would count them twice in the resident set."""
        import mmap
        if mapping is None:
            with open(path, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._map = mapping
        self.views = []
        for lo, size in _token_ranges(path):
            lo4 = (lo + 3) // 4 * 4
            rows = (size - (lo4 - lo)) // (4 * self._ROW)
            if rows:
                self.views.append(np.frombuffer(self._map, np.float32, rows * self._ROW, lo4).reshape(rows, self._ROW))
        self.nbytes = sum(v.nbytes for v in self.views)
        self._out = np.empty(max((v.shape[0] for v in self.views), default=1), np.float32)

    def bandwidth(self, repeats: int = 2) -> float:
        """Bytes per second, best of `repeats` passes."""
        from .kernels.stream import read_rows

        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for v in self.views:
                read_rows(v, self._out[:v.shape[0]])
            best = min(best, time.perf_counter() - t)
        return self.nbytes / best


def _file_mapping(model):
    """The buffer (mmap) the model's weights are views of, or None."""
    try:
        a = model._weights.head[0]
        while isinstance(a, np.ndarray):
            a = a.base
        return a if a is not None and memoryview(a).nbytes == os.path.getsize(model.path) else None
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def weight_bytes_per_token(path) -> int:
    """Bytes of the file's tensors that one decoded token reads: all of them,
    except that only one row of the embedding (and of its scales) is looked up."""
    from .io import read_header

    header, _ = read_header(path)
    vocab = None
    total = emb = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        if name.startswith("emb.weight"):
            emb += hi - lo
            if name == "emb.weight":
                vocab = info["shape"][0]
        else:
            total += hi - lo
    return total + (emb // vocab if vocab else 0)


def require_model_file(path) -> None:
    """Refuse anything but an rwkvcpu .safetensors file, in one line that says how to make one.

    Other checkpoints (.pth, rwkv.cpp .bin, Hugging Face folders) would be converted
    in memory: the weights a token reads would then not be the file's, and the
    file size, the bytes per token and the streamed bandwidth would measure
    the wrong thing."""
    from pathlib import Path

    from .config import FORMAT_NAME
    from .errors import ModelFormatError, open_input
    from .io import read_header
    from .quant.readers.safetensors_file import is_safetensors

    path = os.fspath(path)
    if not os.path.isdir(path):
        with open_input(path, "file", ModelFormatError) as f:
            head = f.read(16)
        if is_safetensors(head):
            # A safetensors file: a corrupt one gets its own message, not advice to convert it.
            header, _ = read_header(path)
            if header["__metadata__"].get("format") == FORMAT_NAME:
                return
    dst = Path(path).with_suffix("").name + "-int8.safetensors"
    raise ModelFormatError(f"{path}: bench measures an rwkvcpu .safetensors file: "
                           f"convert it first with rwkvcpu convert {path} {dst} --dtype int8")


def peak_rss_bytes() -> int:
    """The largest resident set of this process.

    On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss would also count
    the parent's memory for a child started by fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path, *, threads: Optional[int] = None, decode_tokens: int = 200, warmup_tokens: int = 16,
            prompt_tokens: int = 512, prompt_runs: int = 2, start: Optional[float] = None, seed: int = 0,
            bandwidth: bool = True) -> dict:
    """Load a model and time it.

    In order: load (the file is memory-mapped), the first token after a
    TTFT_PROMPT-token prompt, `warmup_tokens` untimed tokens, `decode_tokens`
    timed one-token steps (greedy: each step feeds back the most likely token),
    then a `prompt_tokens`-token prompt at once, `prompt_runs` times.

    With `bandwidth`, the bytes a token reads are also streamed (WeightStream)
    before, between (every 50 tokens) and after the timed steps: the memory
    bandwidth of the same moments, for the roofline (it varies with what else
    runs on the machine).

    Args:
        path: an rwkvcpu .safetensors file (anything else: ModelFormatError, see
            require_model_file).
        threads: as rwkvcpu.load (None: one per physical core; one for a model under 64 MB per token).
        decode_tokens: timed decode steps; the median is reported.
        warmup_tokens: untimed steps before them.
        prompt_tokens: length of the prompt timed for prefill speed.
        prompt_runs: prompts timed; the fastest is reported.
        start: time.perf_counter() when the user's wait began (e.g. process
            start), for `ttft_s`; default: when measure was called.
        seed: for the random prompts.

    Returns:
        a dict: file_bytes, weight_bytes_per_token, threads, load_s, ttft_s
        (start to the first token's logits), decode_ms (median),
        decode_ms_p10, decode_ms_p90, decode_tokens, prefill_tok_s,
        prompt_tokens, peak_rss_bytes.

    Raises:
        InvalidArgumentError: decode_tokens or prompt_tokens outside 1 .. MAX_TOKENS.
        ModelFormatError: not an rwkvcpu model file, or one that does not load.
    """
    start = time.perf_counter() if start is None else start
    from .errors import InvalidArgumentError
    for name, n in (("decode_tokens", decode_tokens), ("prompt_tokens", prompt_tokens)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOKENS:
            raise InvalidArgumentError(f"{name} must be an integer from 1 to {MAX_TOKENS:,}, got {n!r}")
    require_model_file(path)
    import rwkvcpu
    from . import threads as thread_control

    # Before any kernel runs (OpenMP reads its spin setting once); load() sets the same count.
    thread_control.configure(threads)
    t = time.perf_counter()
    model = rwkvcpu.load(path, threads=threads)
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)

    logits, state = model.forward(rng.integers(0, vocab, TTFT_PROMPT).tolist())
    token = int(np.argmax(logits))
    ttft_s = time.perf_counter() - start

    for _ in range(warmup_tokens):
        logits, state = model.forward([token], state)
        token = int(np.argmax(logits))
    mapping = _file_mapping(model) if bandwidth else None
    # Without the model's own mapping, stream only after the peak memory is read (see below).
    stream = WeightStream(path, mapping) if mapping is not None else None
    if stream is not None and stream.nbytes < _MIN_STREAM_BYTES:
        stream = None
    bandwidths = []
    steps = np.empty(decode_tokens)
    for i in range(decode_tokens):
        if stream is not None and i % 50 == 0:
            bandwidths.append(stream.bandwidth())
        t = time.perf_counter()
        logits, state = model.forward([token], state)
        token = int(np.argmax(logits))
        steps[i] = time.perf_counter() - t
    if stream is not None:
        bandwidths.append(stream.bandwidth())

    prompt = rng.integers(0, vocab, prompt_tokens).tolist()
    best = float("inf")
    for _ in range(prompt_runs):
        t = time.perf_counter()
        model.forward(prompt)
        best = min(best, time.perf_counter() - t)

    peak_rss = peak_rss_bytes()
    if bandwidth and stream is None:
        # After the peak memory is read: a second mapping, or a buffer, adds to it.
        stream = WeightStream(path)
        if stream.nbytes >= _MIN_STREAM_BYTES:
            bandwidths = [stream.bandwidth() for _ in range(3)]
        else:
            bandwidths = [memory_bandwidth(model.threads)]
    extra = {}
    if bandwidths:
        extra = {"bandwidth_gbs": float(np.median(bandwidths)) / 1e9,
                 "bandwidth_gbs_min": min(bandwidths) / 1e9, "bandwidth_gbs_max": max(bandwidths) / 1e9}
    return extra | {
        "file_bytes": os.path.getsize(path),
        "weight_bytes_per_token": weight_bytes_per_token(path),
        "threads": model.threads,
        "load_s": load_s,
        "ttft_s": ttft_s,
        **timings(steps, best, prompt_tokens),
        "peak_rss_bytes": peak_rss,
    }


def timings(steps, prompt_s: float, prompt_tokens: int) -> dict:
    """The decode and prompt figures of `measure` (and of the reference's worker, in
    benchmarks/), from the seconds of each decode step and of the best prompt run."""
    steps = np.asarray(steps)
    return {
        "decode_ms": float(np.median(steps) * 1e3),
        "decode_ms_p10": float(np.percentile(steps, 10) * 1e3),
        "decode_ms_p90": float(np.percentile(steps, 90) * 1e3),
        "decode_tokens": int(steps.size),
        "prefill_tok_s": prompt_tokens / prompt_s,
        "prompt_tokens": prompt_tokens,
    }


def roofline(result: dict, bandwidth: Optional[float] = None) -> dict:
    """The decode floor and the share of it reached: roofline_ms = weight_bytes_per_token /
    bandwidth, roofline_pct = 100 * roofline_ms / decode_ms. `bandwidth` in bytes/s; by default
    the one measure() took during decoding."""
    bandwidth = bandwidth if bandwidth is not None else result["bandwidth_gbs"] * 1e9
    floor_ms = result["weight_bytes_per_token"] / bandwidth * 1e3
    return {"bandwidth_gbs": bandwidth / 1e9, "roofline_ms": floor_ms,
            "roofline_pct": 100.0 * floor_ms / result["decode_ms"]}


def format_report(r: dict) -> str:
    """A few human-readable lines of a measure() (+ roofline()) result."""
    lines = [
        f"file            {r['file_bytes'] / 1e6:9.1f} MB   ({r['weight_bytes_per_token'] / 1e6:.1f} MB of weights read per token)",
        f"threads         {r['threads']:9d}",
        f"load            {r['load_s']:9.3f} s",
        f"first token     {r['ttft_s']:9.3f} s    ({TTFT_PROMPT}-token prompt, from the start)",
        f"decode          {r['decode_ms']:9.2f} ms/token  (median of {r['decode_tokens']}; "
        f"p10 {r['decode_ms_p10']:.2f}, p90 {r['decode_ms_p90']:.2f}) = {1e3 / r['decode_ms']:.1f} tokens/s",
        f"prompt          {r['prefill_tok_s']:9.1f} tokens/s ({r['prompt_tokens']}-token prompt)",
        f"peak RSS        {r['peak_rss_bytes'] / 1e6:9.1f} MB   ({100 * r['peak_rss_bytes'] / r['file_bytes']:.0f}% of the file)",
    ]
    if "roofline_ms" in r:
        spread = (f"; {r['bandwidth_gbs_min']:.1f}-{r['bandwidth_gbs_max']:.1f} between decode steps"
                  if "bandwidth_gbs_min" in r else "")
        lines.append(f"bandwidth       {r['bandwidth_gbs']:9.1f} GB/s (streaming the model's weights, "
                     f"{r['threads']} threads{spread})")
        lines.append(f"roofline        {r['roofline_ms']:9.2f} ms/token; decode reaches {r['roofline_pct']:.0f}% of it")
    return "\n".join(lines)
