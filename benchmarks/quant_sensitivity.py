"""Where a quantized model's KL from fp32 comes from: the stored weights, or the kernels?

    python benchmarks/quant_sensitivity.py v6-1.6b            # models made by bench_models.py
    python benchmarks/quant_sensitivity.py v7-0.4b --dtype int4 --tokens 32

For one benchmark shape, runs the same random tokens one by one through
  - the fp32 model (the baseline),
  - the quantized model (its int8/int4 kernels),
  - the fp32 kernels on the quantized model's weights, dequantized to float32,
  - the fp16 model,
and prints each one's mean KL from the baseline, top-1 agreement and largest
logit difference. When the quantized model and the fp32 kernels on its
dequantized weights score alike, the KL is the weights' rounding (amplified or
not by the model), not an error of the kernels; the last line gives what the
kernels add (the int16 activation rounding) on identical weights.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import rwkvcpu
from bench_models import divergence, logits_of
from rwkvcpu import matrix as M


def dequantized(obj):
    """The weights container with every int8/int4 matrix replaced by its float32 dequantization."""
    if isinstance(obj, (M.Int8Matrix, M.Int4Matrix)):
        return M.F32Matrix(M.dequantize(obj))
    if isinstance(obj, tuple):
        items = [dequantized(x) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", help="a shape of benchmarks/bench_models.py whose models exist in --work")
    ap.add_argument("--dtype", default="int8", choices=("int8", "int4"))
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "rwkvcpu-bench"))
    args = ap.parse_args()
    work = Path(args.work)
    path = {d: work / f"{args.shape}-{d}.safetensors" for d in ("fp32", "fp16", args.dtype)}
    missing = [str(p) for p in path.values() if not p.exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found: run "
                         f"python benchmarks/bench_models.py --shapes {args.shape} first")

    tokens = np.random.default_rng(2).integers(0, rwkvcpu.load(path["fp32"]).config.vocab_size,
                                               args.tokens).tolist()
    base = logits_of(rwkvcpu.load(path["fp32"]), tokens)
    quantized = rwkvcpu.load(path[args.dtype])
    q = logits_of(quantized, tokens)
    quantized._weights = dequantized(quantized._weights)
    dq = logits_of(quantized, tokens)
    f16 = logits_of(rwkvcpu.load(path["fp16"]), tokens)

    print(f"{args.shape}, {args.tokens} random tokens; fp32 logits' standard deviation {base.std():.2f}")
    for name, z in ((f"{args.dtype} kernels", q), (f"fp32 kernels on the {args.dtype} weights dequantized", dq),
                    ("fp16", f16)):
        d = divergence(base, z)
        print(f"  {name:45s} KL {d['kl']:.3e}  top-1 {d['top1_agree']:.2f}  "
              f"max |logit diff| {np.abs(base - z).max():.3f}")
    print(f"  {args.dtype} kernels vs fp32 kernels on the same weights: KL {divergence(dq, q)['kl']:.2e}, "
          f"max |logit diff| {np.abs(q - dq).max():.2e}")


if __name__ == "__main__":
    main()
