"""The model shipped in models/: present, within its size budget, and computed right.

The golden logits (tests/golden/shipped_logits.npz) come from the training code's own fp32
forward (models/train/make_golden.py: PyTorch, step-by-step recurrence) on exactly the
weights stored in the shipped file, over a 512-token passage of dev.txt. The engine must
match them within 1e-4: an independent check of the whole v7 path (converter transforms,
kernels, tokenizer-free forward) on a genuinely trained model. No torch needed here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import rwkvcpu
from rwkvcpu.models import DEFAULT_MODEL_NAME, default_model_path

GOLDEN = Path(__file__).parent / "golden" / "shipped_logits.npz"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
TOLERANCE = 1e-4
SIZE_BUDGET = 32_000_000


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as g:
        return {k: g[k] for k in g.files}


def test_shipped_model_is_installed_with_the_package():
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_NAME
    assert path.is_file(), f"{path}: the shipped model is missing"


def test_models_folder_within_size_budget():
    files = [p for p in MODELS_DIR.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert total <= SIZE_BUDGET, f"models/ holds {total:,} bytes (budget {SIZE_BUDGET:,})"


def test_golden_is_for_this_model_file(golden):
    digest = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert digest == str(golden["model_sha256"]), (
        "the shipped model changed; regenerate the golden with models/train/make_golden.py")


def test_shipped_model_metadata():
    info = rwkvcpu.load(default_model_path()).info
    assert info["generation"] == "v7"
    assert info["tokenizer"] == "embedded"


@pytest.mark.parametrize("dtype", [None, "fp32"], ids=["stored-fp16", "fp32"])
def test_engine_logits_match_training_forward(golden, dtype):
    model = rwkvcpu.load(default_model_path(), dtype=dtype)
    tokens = golden["tokens"].tolist()
    logits, _ = model.forward(tokens, all_logits=True)
    assert logits.shape == (len(tokens), model.config.vocab_size)

    subset = logits[:, golden["subset_ids"]]
    full = logits[golden["full_positions"]]
    target = logits[np.arange(len(tokens) - 1), golden["tokens"][1:]]
    errors = {
        "subset": np.abs(subset - golden["subset_logits"]).max(),
        "full": np.abs(full - golden["full_logits"]).max(),
        "next_token": np.abs(target - golden["next_token_logits"]).max(),
    }
    assert max(errors.values()) <= TOLERANCE, errors
