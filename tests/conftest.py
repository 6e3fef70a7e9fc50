"""Shared test fixtures: where the shared data lives, and the reference oracle.

Tests that need ../shared (tiny rwkv.cpp models, tokenizers, corpus) skip with
a reason when it is absent, so a fresh clone elsewhere still passes. Tests that
need the reference `rwkv` package (and torch) skip when it is not installed.
"""

import os
import signal
from pathlib import Path

import pytest

# A shell starts background jobs with Ctrl-C ignored (`pytest &`, nohup in a script), and a child
# inherits that: the tests that stop `rwkvcpu chat` or `serve` with SIGINT, as a user's Ctrl-C does,
# would wait on processes that cannot hear it. Give this process, and so every child, the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


def _find_shared():
    env = os.environ.get("RWKVCPU_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / "shared"]:
        if (cand / "fixtures" / "tiny-rwkv").is_dir():
            return cand
    return None


SHARED = _find_shared()
TINY_STEMS = {
    "v4": "tiny-rwkv-4v0-660K",
    "v5.0": "tiny-rwkv-5v1-730K",
    "v5.2": "tiny-rwkv-5v2-730K",
    "v6": "tiny-rwkv-6v0-1m",
    "v7": "tiny-rwkv-7v0-834K",
}
TINY_VARIANTS = ("FP32", "FP16", "Q5_0", "Q5_1")


@pytest.fixture(scope="session")
def shared_dir():
    if SHARED is None:
        pytest.skip("../shared is not beside this checkout (set RWKVCPU_SHARED to its path)")
    return SHARED


def tiny_model_path(generation, variant="FP32"):
    """Path of a shared tiny rwkv.cpp model; skips the test when ../shared is absent."""
    if SHARED is None:
        pytest.skip("../shared is not beside this checkout (set RWKVCPU_SHARED to its path)")
    return SHARED / "fixtures" / "tiny-rwkv" / f"{TINY_STEMS[generation]}-{variant}.bin"


def _oracle_available():
    # Look the packages up without importing them: importing torch costs seconds
    # in every session, also in those that run no oracle test.
    import importlib.util
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "rwkv"))


requires_oracle = pytest.mark.skipif(
    not _oracle_available(),
    reason="the reference `rwkv` package and torch are not installed (pip install '.[oracle]')",
)


@pytest.fixture(scope="session")
def seeds(tmp_path_factory):
    """Valid files of every input format, small (tests/hostile_files.build_seeds)."""
    from hostile_files import build_seeds
    return build_seeds(tmp_path_factory.mktemp("seeds"), SHARED)


@pytest.fixture(scope="session")
def sandbox(seeds):
    """A worker that runs each hostile-input case in a child with a memory limit and a timeout
    (tests/sandbox.py), its kernels compiled on the seed models."""
    from sandbox import Sandbox
    with Sandbox(warm=seeds.warm()) as box:
        yield box
