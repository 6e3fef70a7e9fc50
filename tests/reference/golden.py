"""The cases behind tests/golden/engine_*.npz, shared by make_engine_golden.py and the tests.

Random cases: a small random official-layout model per generation, rebuilt
from its seed by official.random_official, so only logits are stored. Tiny
cases: the shared rwkv.cpp FP32 fixtures, run by the reference package with its
hard-coded group-norm epsilon 64e-5.

Each golden file holds: tokens (T,), positions (P,), one (P, V) = the
reference's logits after tokens[p] fed one by one, seq (V,) = its logits after
feeding all tokens at once, and for random cases a checksum of the model.
"""

from pathlib import Path

import numpy as np

from . import official

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
N_TOKENS = 64
POSITIONS = np.array(list(range(0, N_TOKENS, 4)) + [N_TOKENS - 1])

# name -> random_official arguments
RANDOM_CASES = {
    "v4": dict(generation="v4", seed=4),
    "v5.0": dict(generation="v5.0", seed=50),
    "v5.1": dict(generation="v5.1", seed=51),
    "v5.2": dict(generation="v5.2", seed=52),
    "v6": dict(generation="v6", seed=6),
    "v6-state": dict(generation="v6", seed=60, time_state=True),
    "v7": dict(generation="v7", seed=7),
}
SIZE = dict(n_layer=2, n_embd=64, vocab_size=256, head_size=32)

# name -> shared fixture stem (FP32 rwkv.cpp files)
TINY_CASES = {
    "tiny-4v0": "tiny-rwkv-4v0-660K",
    "tiny-5v1": "tiny-rwkv-5v1-730K",
    "tiny-5v2": "tiny-rwkv-5v2-730K",
    "tiny-6v0": "tiny-rwkv-6v0-1m",
    "tiny-7v0": "tiny-rwkv-7v0-834K",
}


def golden_path(name):
    return GOLDEN / f"engine_{name}.npz"


def random_case(name):
    """(generation, official state dict, tokens) of a random case."""
    args = dict(RANDOM_CASES[name])
    generation = args.pop("generation")
    sd = official.random_official(generation, **SIZE, **args)
    tokens = np.random.default_rng(args["seed"] + 1000).integers(0, SIZE["vocab_size"], N_TOKENS)
    return generation, sd, tokens


def tiny_tokens(shared_dir):
    """The bytes '"in' (ids 34, 105, 110) and then the start of corpus/dev.txt."""
    text = (Path(shared_dir) / "corpus" / "dev.txt").read_bytes()[:N_TOKENS - 3]
    return np.array([34, 105, 110] + list(text))


def checksum(tensors):
    """A float summary of a model's canonical tensors (detects a changed random generator)."""
    return float(sum(np.abs(np.asarray(a, np.float64)).sum() for a in tensors.values()))
