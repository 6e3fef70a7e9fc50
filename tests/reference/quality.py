"""How far quantized weights move the next-token distribution, on real text.

    python -m reference.quality [n_bytes]        (from tests/; needs ../shared)

prints, per tiny fixture and dtype, the mean KL(p_fp32 || p_dtype) over the
next-token distributions after each byte of corpus/dev.txt, and how often the
most likely next byte is the same (top-1 agreement).
"""

import sys

import numpy as np

import rwkvcpu

DTYPES = ("fp16", "int8", "int4")


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(ref_logits, logits):
    """(mean KL(ref || other) in nats, top-1 agreement) over rows of (T, V) logits."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = (ref_logits.argmax(axis=-1) == logits.argmax(axis=-1)).mean()
    return float(kl.mean()), float(top1)


def corpus_tokens(shared_dir, n_bytes):
    raw = (shared_dir / "corpus" / "dev.txt").read_bytes()[:n_bytes]
    return np.frombuffer(raw, np.uint8).astype(np.int64)


def measure(fixture, tokens, dtypes=DTYPES):
    """{dtype: (mean KL, top-1 agreement)} of one rwkv.cpp FP32 fixture, converted at each dtype."""
    ref, _ = rwkvcpu.load(fixture, dtype="fp32").forward(tokens, all_logits=True)
    out = {}
    for dtype in dtypes:
        logits, _ = rwkvcpu.load(fixture, dtype=dtype).forward(tokens, all_logits=True)
        out[dtype] = compare(ref, logits)
    return out


def main():
    from conftest import SHARED, TINY_STEMS
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    tokens = corpus_tokens(SHARED, n)
    print(f"{n} bytes of corpus/dev.txt; mean KL(fp32 || dtype) in nats, top-1 agreement with fp32")
    print(f"| model | {' | '.join(f'{d} KL | {d} top-1' for d in DTYPES)} |")
    print("|---" * (1 + 2 * len(DTYPES)) + "|")
    for stem in TINY_STEMS.values():
        res = measure(SHARED / "fixtures" / "tiny-rwkv" / f"{stem}-FP32.bin", tokens)
        cells = " | ".join(f"{res[d][0]:.2e} | {res[d][1]:.4f}" for d in DTYPES)
        print(f"| {stem} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
