"""fp32 engine vs the live reference `rwkv` package (strategy 'cpu fp32'), when torch is installed.

Fresh random official-layout models of every generation (seeds other than the
goldens'), the converter's own random models written as .pth and loaded
through rwkvcpu.load, and the tiny rwkv.cpp fixtures: 64 tokens one by one and
as a sequence, max |logit difference| <= 1e-4.
"""

import numpy as np
import pytest

import rwkvcpu
from conftest import SHARED, requires_oracle
from reference import golden, official
from reference.oracle import run_oracle

pytestmark = [requires_oracle, pytest.mark.oracle]

TOL = 1e-4
GENERATIONS = ("v4", "v5.0", "v5.1", "v5.2", "v6", "v7")


def _cases():
    """(id, generation, official state dict, tokens, how to build our model)."""
    from checkpoints import random_official_state_dict
    rng = np.random.default_rng(123)
    cases = []
    for i, gen in enumerate(GENERATIONS):
        tokens = rng.integers(0, 256, 64)
        sd = official.random_official(gen, n_layer=3, n_embd=128, vocab_size=256, head_size=64, seed=900 + i)
        cases.append((f"mine-{gen}", gen, sd, tokens, "canonical"))
        sd = random_official_state_dict(gen, 2, 64, 256, head_size=32, seed=700 + i,
                                        time_state=gen in ("v5.2", "v6"))
        cases.append((f"converter-{gen}", gen, sd, tokens, "pth"))
    if SHARED is not None:
        tokens = golden.tiny_tokens(SHARED)
        for name, stem in golden.TINY_CASES.items():
            gen, sd = official.official_from_rwkvcpp(SHARED / "fixtures" / "tiny-rwkv" / f"{stem}-FP32.bin")
            cases.append((name, gen, sd, tokens, "canonical"))
    return cases


@pytest.fixture(scope="module")
def oracle_runs():
    cases = _cases()
    results = run_oracle([{"sd": sd, "generation": gen, "tokens": tok} for _, gen, sd, tok, _ in cases])
    return {c[0]: (c, r) for c, r in zip(cases, results)}


def _model(case, tmp_path):
    _, gen, sd, _, how = case
    if how == "pth":
        from checkpoints import write_pth
        return rwkvcpu.load(write_pth(tmp_path / "m.pth", sd, dtype="fp32"), dtype="fp32")
    config, tensors = official.canonical_from_official(gen, sd)
    return rwkvcpu.load(official.write_model(tmp_path / "m.safetensors", config, tensors))


def test_every_case_matches(oracle_runs, tmp_path):
    failures = []
    for name, (case, ref) in oracle_runs.items():
        model = _model(case, tmp_path)
        tokens = case[3]
        state, one = None, []
        for t in tokens:
            logits, state = model.forward([int(t)], state)
            one.append(logits)
        seq, _ = model.forward(tokens, all_logits=True)
        d_one = np.abs(np.array(one) - ref["one"]).max()
        d_seq = np.abs(seq - ref["one"]).max()
        if not (d_one <= TOL and d_seq <= TOL):
            failures.append(f"{name}: one-by-one {d_one:.2e}, sequence {d_seq:.2e}")
    assert not failures, "; ".join(failures)


def report():
    """Print each case's max |logit difference| from the reference (python test_engine_oracle.py, from tests/)."""
    import tempfile
    from pathlib import Path
    cases = _cases()
    results = run_oracle([{"sd": sd, "generation": gen, "tokens": tok} for _, gen, sd, tok, _ in cases])
    print("| case | one by one | sequence |\n| --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for case, ref in zip(cases, results):
            model = _model(case, Path(tmp))
            state, one = None, []
            for t in case[3]:
                logits, state = model.forward([int(t)], state)
                one.append(logits)
            seq, _ = model.forward(case[3], all_logits=True)
            print(f"| {case[0]} | {np.abs(np.array(one) - ref['one']).max():.1e} | "
                  f"{np.abs(seq - ref['one']).max():.1e} |", flush=True)


if __name__ == "__main__":
    report()
