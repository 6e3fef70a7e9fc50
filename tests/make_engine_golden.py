"""Regenerate tests/golden/engine_*.npz with the reference `rwkv` package (needs torch).

    pip install -e '.[test,oracle]'
    python tests/make_engine_golden.py            # all cases (tiny ones need ../shared)

Random models are rebuilt from their seeds (tests/reference/golden.py), so the
files hold only tokens and the reference's logits.
"""

import sys

import numpy as np

from reference import golden, official
from reference.oracle import run_oracle


def main():
    from conftest import SHARED
    jobs, names, extra = [], [], []
    for name in golden.RANDOM_CASES:
        generation, sd, tokens = golden.random_case(name)
        _, tensors = official.canonical_from_official(generation, sd)
        jobs.append({"sd": sd, "generation": generation, "tokens": tokens})
        names.append(name)
        extra.append({"checksum": golden.checksum(tensors)})
    if SHARED is None:
        print("../shared not found: skipping the tiny fixture cases", file=sys.stderr)
    else:
        tokens = golden.tiny_tokens(SHARED)
        for name, stem in golden.TINY_CASES.items():
            generation, sd = official.official_from_rwkvcpp(SHARED / "fixtures" / "tiny-rwkv" / f"{stem}-FP32.bin")
            jobs.append({"sd": sd, "generation": generation, "tokens": tokens})
            names.append(name)
            extra.append({})
    results = run_oracle(jobs)
    golden.GOLDEN.mkdir(exist_ok=True)
    for name, job, res, ex in zip(names, jobs, results, extra):
        path = golden.golden_path(name)
        np.savez_compressed(path, tokens=np.asarray(job["tokens"], np.int64), positions=golden.POSITIONS,
                            one=res["one"][golden.POSITIONS], seq=res["seq"], **ex)
        print(f"{path.name}: {job['generation']}, {len(job['tokens'])} tokens, "
              f"oracle one-vs-seq {np.abs(res['one'][-1] - res['seq']).max():.2e}")


if __name__ == "__main__":
    main()
