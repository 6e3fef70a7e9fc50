"""Time rwkv.cpp (the C runtime, built by hand outside this repository) on one of its model files.

Run by bench_models.py in a fresh process per model, and prints one JSON object
with the same figures as `rwkvcpu bench --json`:

    python benchmarks/rwkvcpp_worker.py ~/peers/rwkv.cpp model-Q8_0.bin --threads 2

Also makes its model files from an official .pth (its own converter, which needs
torch, then its own quantizer):

    python benchmarks/rwkvcpp_worker.py ~/peers/rwkv.cpp out-Q8_0.bin --make-from model.pth

RWKV_CPP is the folder rwkv.cpp was built in (or its librwkv.so): build it from
its public source at the commit the benchmark names (benchmarks/RESULTS.md),
e.g. `cmake -B build -DCMAKE_BUILD_TYPE=Release -DRWKV_STANDALONE=ON && cmake
--build build -j2`. Nothing of it is part of rwkvcpu: this worker only loads
the library through ctypes. Decode is timed with `rwkv_eval` one token at a
time; a prompt with `rwkv_eval_sequence_in_chunks` (chunks of --chunk tokens).
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rwkvcpu.bench import peak_rss_bytes, timings  # noqa: E402  (numpy and the standard library only)

TTFT_PROMPT = 16
# rwkv.cpp's file formats that pair with ours (its name -> ours), in the order measured.
FORMATS = {"FP32": "fp32", "FP16": "fp16", "Q8_0": "int8", "Q4_0": "int4"}


def library_path(root) -> Path:
    """librwkv.so in `root` (a file, or a folder holding it or its build/ folder)."""
    root = Path(root).expanduser()
    for p in (root, root / "librwkv.so", root / "build" / "librwkv.so"):
        if p.is_file():
            return p
    raise SystemExit(f"error: no librwkv.so in {root} or {root / 'build'}: build rwkv.cpp there first "
                     "(cmake -B build -DCMAKE_BUILD_TYPE=Release -DRWKV_STANDALONE=ON && cmake --build build)")


def source_root(root) -> Path:
    """The rwkv.cpp source folder (holding python/convert_pytorch_to_ggml.py) for a library path."""
    lib = library_path(root)
    for p in (lib.parent, lib.parent.parent):
        if (p / "python" / "convert_pytorch_to_ggml.py").is_file():
            return p
    raise SystemExit(f"error: no python/convert_pytorch_to_ggml.py next to {lib}")


def load_library(root) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path(root)))
    f32p = ctypes.POINTER(ctypes.c_float)
    u32p = ctypes.POINTER(ctypes.c_uint32)
    lib.rwkv_init_from_file.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32]
    lib.rwkv_init_from_file.restype = ctypes.c_void_p
    lib.rwkv_eval.argtypes = [ctypes.c_void_p, ctypes.c_uint32, f32p, f32p, f32p]
    lib.rwkv_eval.restype = ctypes.c_bool
    lib.rwkv_eval_sequence_in_chunks.argtypes = [ctypes.c_void_p, u32p, ctypes.c_size_t, ctypes.c_size_t,
                                                 f32p, f32p, f32p]
    lib.rwkv_eval_sequence_in_chunks.restype = ctypes.c_bool
    for name in ("rwkv_get_n_vocab", "rwkv_get_state_len", "rwkv_get_logits_len"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_size_t
    lib.rwkv_init_state.argtypes = [ctypes.c_void_p, f32p]
    lib.rwkv_init_state.restype = None
    lib.rwkv_free.argtypes = [ctypes.c_void_p]
    lib.rwkv_free.restype = None
    lib.rwkv_quantize_model_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.rwkv_quantize_model_file.restype = ctypes.c_bool
    lib.rwkv_get_system_info_string.argtypes = []
    lib.rwkv_get_system_info_string.restype = ctypes.c_char_p
    return lib


def _without_unused_tensors(pth: Path, tmp: Path) -> Path:
    """The .pth without layer 0's v0/v1/v2 (official v7 checkpoints carry them; the value residual
    never uses them): rwkv.cpp 4358e70's loader reads every tensor of its file but allocates only
    those it uses, and aborts (GGML_ASSERT "tensor buffer not set") on these three."""
    import torch
    sd = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
    unused = [k for k in sd if k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")]
    if not unused:
        return pth
    torch.save({k: v for k, v in sd.items() if k not in unused}, tmp)
    return tmp


def make_model(root, pth: Path, out: Path) -> None:
    """out (NAME-FMT.bin, FMT in FORMATS) from an official .pth: rwkv.cpp's converter to FP16
    (or FP32), then its quantizer. Written under a temporary name, renamed when complete."""
    fmt = out.stem.rsplit("-", 1)[-1]
    if fmt not in FORMATS:
        raise SystemExit(f"error: {out.name}: the name must end in -FMT.bin, FMT one of {', '.join(FORMATS)}")
    base = out.with_name(out.stem.rsplit("-", 1)[0] + ("-FP32.bin" if fmt == "FP32" else "-FP16.bin"))
    if not base.exists():
        tmp = base.with_suffix(".tmp")
        src = _without_unused_tensors(pth, base.with_suffix(".pth.tmp"))
        try:
            subprocess.run([sys.executable, str(source_root(root) / "python" / "convert_pytorch_to_ggml.py"),
                            str(src), str(tmp), "FP32" if fmt == "FP32" else "FP16"], check=True,
                           stdout=subprocess.DEVNULL)
        finally:
            if src != pth:
                src.unlink()
        os.replace(tmp, base)
    if base != out:
        tmp = out.with_suffix(".tmp")
        lib = load_library(root)
        # The quantizer prints a line per tensor on the C library's stdout.
        saved = os.dup(1)
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            try:
                ok = lib.rwkv_quantize_model_file(str(base).encode(), str(tmp).encode(), fmt.encode())
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        if not ok:
            raise SystemExit(f"error: rwkv.cpp could not quantize {base} to {fmt}")
        os.replace(tmp, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rwkv_cpp", help="folder where rwkv.cpp was built (or its librwkv.so)")
    ap.add_argument("model", help="an rwkv.cpp .bin model file")
    ap.add_argument("--make-from", metavar="PTH", help="write MODEL from this official .pth instead of timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--prompt-runs", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64, help="tokens per rwkv_eval_sequence_in_chunks chunk")
    args = ap.parse_args()
    if args.make_from:
        make_model(args.rwkv_cpp, Path(args.make_from), Path(args.model))
        return

    lib = load_library(args.rwkv_cpp)
    f32p = ctypes.POINTER(ctypes.c_float)
    t = time.perf_counter()
    ctx = lib.rwkv_init_from_file(args.model.encode(), args.threads, 0)
    if not ctx:
        raise SystemExit(f"error: rwkv.cpp could not load {args.model}")
    load_s = time.perf_counter() - t
    vocab = lib.rwkv_get_n_vocab(ctx)
    state = np.empty(lib.rwkv_get_state_len(ctx), np.float32)
    logits = np.empty(lib.rwkv_get_logits_len(ctx), np.float32)
    sp, lp = state.ctypes.data_as(f32p), logits.ctypes.data_as(f32p)
    rng = np.random.default_rng(0)

    def sequence(tokens, chunk):
        toks = np.ascontiguousarray(tokens, np.uint32)
        lib.rwkv_init_state(ctx, sp)
        ok = lib.rwkv_eval_sequence_in_chunks(ctx, toks.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                                              toks.size, chunk, sp, sp, lp)
        if not ok:
            raise SystemExit("error: rwkv_eval_sequence_in_chunks failed")

    sequence(rng.integers(0, vocab, TTFT_PROMPT), TTFT_PROMPT)
    token = int(np.argmax(logits))
    ttft_s = time.perf_counter() - START
    for _ in range(args.warmup):
        lib.rwkv_eval(ctx, token, sp, sp, lp)
        token = int(np.argmax(logits))
    steps = np.empty(args.tokens)
    for i in range(args.tokens):
        t = time.perf_counter()
        lib.rwkv_eval(ctx, token, sp, sp, lp)
        token = int(np.argmax(logits))
        steps[i] = time.perf_counter() - t
    prompt = rng.integers(0, vocab, args.prompt)
    # The first call of a chunk length builds and caches its graph: run once untimed.
    sequence(prompt[:args.chunk], args.chunk)
    best = float("inf")
    for _ in range(args.prompt_runs):
        t = time.perf_counter()
        sequence(prompt, args.chunk)
        best = min(best, time.perf_counter() - t)
    lib.rwkv_free(ctx)
    print(json.dumps({
        "file_bytes": os.path.getsize(args.model),
        "threads": args.threads,
        "load_s": load_s,
        "ttft_s": ttft_s,
        **timings(steps, best, args.prompt),
        "peak_rss_bytes": peak_rss_bytes(),
        "system_info": lib.rwkv_get_system_info_string().decode(),
    }))


if __name__ == "__main__":
    main()
