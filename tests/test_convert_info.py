"""`rwkvcpu info` on every readable input format, and `rwkvcpu convert` end to end."""

from pathlib import Path

import numpy as np
import pytest

import rwkvcpu.tokenizers

from conftest import tiny_model_path
from checkpoints import random_official_state_dict, write_pth

NEOX_TOKENIZER = Path(rwkvcpu.tokenizers.__file__).parent / "20B_tokenizer.json"


def run_cli(args, capsys):
    from rwkvcpu.cli.main import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def rows(text):
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in text.splitlines()}


def test_convert_then_info(tmp_path, capsys):
    src = tiny_model_path("v5.2", "Q5_0")
    dst = tmp_path / "m.safetensors"
    code, _, err = run_cli(["convert", src, dst, "--dtype", "int4"], capsys)
    assert code == 0 and "wrote" in err
    code, out, _ = run_cli(["info", dst], capsys)
    r = rows(out)
    assert code == 0
    assert r["generation"] == "v5.2" and r["layers"] == "12" and r["width"] == "64"
    assert r["heads"] == "8 of size 8" and r["dtype"] == "int4"
    assert r["source_file"] == src.name and r["tokenizer"] == "bytes"
    assert r["size on disk"].startswith(f"{dst.stat().st_size:,} bytes")
    assert r["parameters"].startswith("7")          # ~730K, as the file name says


def test_info_on_an_rwkv_cpp_file(capsys):
    code, out, _ = run_cli(["info", tiny_model_path("v4", "Q5_1")], capsys)
    r = rows(out)
    assert code == 0 and r["generation"] == "v4" and r["format"] == "rwkv.cpp"
    assert "Q5_1" in r["tensors"] and r["convertible"] == "yes"


def test_info_on_pth_files(tmp_path, capsys):
    sd = random_official_state_dict("v6", n_layer=2, n_embd=64, vocab_size=256, head_size=32)
    write_pth(tmp_path / "m.pth", sd)
    code, out, _ = run_cli(["info", tmp_path / "m.pth"], capsys)
    r = rows(out)
    assert code == 0 and r["generation"] == "v6" and r["format"] == "pth"
    # Counted as the converted file counts them; what the checkpoint stores besides is said.
    code, _, err = run_cli(["convert", tmp_path / "m.pth", tmp_path / "m.safetensors", "-q"], capsys)
    assert code == 0, err
    converted = rows(run_cli(["info", tmp_path / "m.safetensors"], capsys)[1])["parameters"]
    stored = sum(v.size for v in sd.values())
    assert stored == int(converted.split()[0].replace(",", "")) + 2 * 64
    assert r["parameters"] == f"{converted}, as converted (the checkpoint stores {stored:,}: 128 of ln0, " \
                              f"folded into emb.weight)"
    assert r["tensors"].startswith(f"{len(sd)}: BF16")
    assert r["convertible"] == "yes"
    states = {f"blocks.{i}.att.time_state": np.zeros((2, 32, 32), np.float32) for i in range(2)}
    write_pth(tmp_path / "state.pth", states)
    code, out, _ = run_cli(["info", tmp_path / "state.pth"], capsys)
    assert code == 0 and "state-tuning" in rows(out)["format"]


def test_embedded_tokenizer_and_eps_from_cli(tmp_path, capsys):
    # a v7 source of the padded NeoX vocabulary and the tokenizer.json shipped in the
    # package: no ../shared needed
    src = write_pth(tmp_path / "m.pth", random_official_state_dict("v7", 2, 32, 50304, head_size=32))
    dst = tmp_path / "m.safetensors"
    code, _, err = run_cli(["convert", src, dst, "--dtype", "fp16", "--tokenizer", NEOX_TOKENIZER,
                            "--eps", "1e-5", "-q"], capsys)
    assert code == 0 and err == ""
    r = rows(run_cli(["info", dst], capsys)[1])
    assert r["tokenizer"] == "embedded" and r["group-norm epsilon"] == "1e-05"
    n = len(NEOX_TOKENIZER.read_text(encoding="utf-8"))
    assert r["tokenizer_json"].endswith("characters)") and f"{n:,}" in r["tokenizer_json"]
