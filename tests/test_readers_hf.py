"""Hugging Face folders (transformers RWKV-4, fla RWKV-7) and state-tuning files.

The folders are built from official random state dicts by the renames each
project's own conversion script applies, so converting them must give exactly
what converting the official checkpoint gives.
"""

import json

import numpy as np
import pytest

from rwkvcpu.errors import ModelFormatError
from rwkvcpu.quant.convert import read_checkpoint
from checkpoints import random_official_state_dict, write_pth
from reference.hf_layouts import fla_names, transformers_names

DIMS = dict(n_layer=3, n_embd=128, vocab_size=256, head_size=32)


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pytorch_model.bin"])
def test_transformers_rwkv4_folder(tmp_path, layout):
    from safetensors.numpy import save_file

    sd = random_official_state_dict("v4", **DIMS)
    write_pth(tmp_path / "official.pth", sd)
    hf = transformers_names(sd)
    folder = tmp_path / "rwkv-4-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["RwkvForCausalLM"], "model_type": "rwkv"}))
    if layout == "safetensors":
        save_file(hf, folder / "model.safetensors")
    elif layout == "sharded":
        names = sorted(hf)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for f, ks in shards.items():
            save_file({k: hf[k] for k in ks}, folder / f)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    else:
        write_pth(folder / "pytorch_model.bin", hf)
    for dtype in ("fp32", "int8"):
        meta, got = read_checkpoint(folder, dtype=dtype)
        _, want = read_checkpoint(tmp_path / "official.pth", dtype=dtype)
        assert meta["generation"] == "v4" and meta["source_format"] == "hf-transformers"
        _same(got, want)


def fla_folder(tmp_path):
    """A random official v7 written as official.pth and as an fla folder: (folder, official .pth)."""
    from safetensors.numpy import save_file

    sd = random_official_state_dict("v7", **DIMS)
    pth = write_pth(tmp_path / "official.pth", sd)
    folder = tmp_path / "rwkv7-fla"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["RWKV7ForCausalLM"], "head_dim": 32, "norm_eps": 1e-5}))
    save_file(fla_names(sd), folder / "model.safetensors")
    return folder, pth


def test_fla_rwkv7_folder(tmp_path):
    folder, _ = fla_folder(tmp_path)
    meta, got = read_checkpoint(folder, dtype="fp32")
    _, want = read_checkpoint(tmp_path / "official.pth", dtype="fp32")
    assert meta["generation"] == "v7" and meta["source_format"] == "hf-fla"
    # fla's g_norm epsilon is head_dim * norm_eps.
    assert float(meta["group_norm_eps"]) == pytest.approx(32e-5)
    _same(got, want)


def test_state_tuning_file_merged_as_initial_state(tmp_path):
    for gen in ("v5.2", "v6", "v7"):
        full = random_official_state_dict(gen, time_state=True, seed=5, **DIMS)
        states = {k: v for k, v in full.items() if k.endswith("att.time_state")}
        model = {k: v for k, v in full.items() if k not in states}
        write_pth(tmp_path / "model.pth", model)
        write_pth(tmp_path / "state.pth", states)
        meta, t = read_checkpoint(tmp_path / "model.pth", dtype="fp32", state=tmp_path / "state.pth")
        assert meta["state_file"] == "state.pth"
        for i in range(DIMS["n_layer"]):
            s = states[f"blocks.{i}.att.time_state"]
            # Files hold [head, value, key]; v5/v6 run [head, key, value], v7 [head, value, key].
            want = s if gen == "v7" else s.transpose(0, 2, 1)
            assert np.abs(t[f"blocks.{i}.att.time_state"] - want).max() == 0.0
        _, plain = read_checkpoint(tmp_path / "model.pth", dtype="fp32")
        assert not any(k.endswith("time_state") for k in plain)


def test_state_tuning_file_errors(tmp_path):
    full = random_official_state_dict("v6", time_state=True, **DIMS)
    states = {k: v for k, v in full.items() if k.endswith("att.time_state")}
    write_pth(tmp_path / "model.pth", {k: v for k, v in full.items() if k not in states})
    write_pth(tmp_path / "state.pth", states)
    with pytest.raises(ModelFormatError, match="state-tuning file .* --state"):
        read_checkpoint(tmp_path / "state.pth")
    wrong = dict(states)
    wrong["blocks.0.att.time_state"] = np.zeros((2, 64, 64), np.float32)
    write_pth(tmp_path / "wrong.pth", wrong)
    with pytest.raises(ModelFormatError, match=r"blocks.0.att.time_state has shape \(2, 64, 64\), expected \(4, 32, 32\)"):
        read_checkpoint(tmp_path / "model.pth", state=tmp_path / "wrong.pth")
    short = {k: v for k, v in states.items() if not k.startswith("blocks.2.")}
    write_pth(tmp_path / "short.pth", short)
    with pytest.raises(ModelFormatError, match="the model has 3"):
        read_checkpoint(tmp_path / "model.pth", state=tmp_path / "short.pth")


def test_generate_reads_a_folder_like_its_official_checkpoint(tmp_path):
    """`rwkvcpu generate -m FOLDER` converts the Hugging Face folder in memory, as for a .pth."""
    from click.testing import CliRunner

    import rwkvcpu
    from rwkvcpu.cli.main import cli

    folder, pth = fla_folder(tmp_path)
    args = ["-n", "12", "-t", "0", "--presence-penalty", "0", "--frequency-penalty", "0", "In the"]
    from_folder = CliRunner().invoke(cli, ["generate", "-m", str(folder), *args])
    assert from_folder.exit_code == 0, from_folder.output
    # fla's group-norm epsilon is head_dim * norm_eps; the official default is 64e-5.
    official = rwkvcpu.load(pth, group_norm_eps=32e-5)
    want = official.complete("In the", max_tokens=12, temperature=0, presence_penalty=0, frequency_penalty=0)
    assert from_folder.stdout == want != ""
