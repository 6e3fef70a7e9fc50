"""`rwkvcpu bench MODEL` and rwkvcpu.bench: the figures are there and sane (no timing thresholds)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from generate_fakes import tiny_v7_file  # noqa: F401 (fixture)
from rwkvcpu import bench
from rwkvcpu.cli.main import cli

KEYS = {"file_bytes", "weight_bytes_per_token", "threads", "load_s", "ttft_s", "decode_ms", "decode_ms_p10",
        "decode_ms_p90", "decode_tokens", "prefill_tok_s", "prompt_tokens", "peak_rss_bytes"}


def test_bench_json(tiny_v7_file):
    result = CliRunner().invoke(cli, ["bench", str(tiny_v7_file), "--json", "--threads", "1", "-n", "3",
                                      "--prompt", "5", "--no-bandwidth"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert KEYS <= set(r)
    assert r["threads"] == 1 and r["decode_tokens"] == 3 and r["prompt_tokens"] == 5
    assert 0 < r["decode_ms_p10"] <= r["decode_ms"] <= r["decode_ms_p90"]
    assert r["prefill_tok_s"] > 0 and r["load_s"] > 0 and r["ttft_s"] >= r["load_s"]
    assert 0 < r["weight_bytes_per_token"] < r["file_bytes"] < r["peak_rss_bytes"]


def test_bench_text_report_with_roofline(tiny_v7_file, monkeypatch):
    # The tiny model fits in the caches, so the bandwidth comes from a buffer; a
    # fake one keeps the test fast. The report must still show the roofline.
    monkeypatch.setattr(bench, "memory_bandwidth", lambda threads: 20e9)
    result = CliRunner().invoke(cli, ["bench", str(tiny_v7_file), "-n", "2", "--prompt", "3"])
    assert result.exit_code == 0, result.output
    for word in ("decode", "prompt", "peak RSS", "roofline", "20.0 GB/s"):
        assert word in result.stdout


def test_weight_stream_reads_the_tokens_bytes(tmp_path):
    """WeightStream covers the file's tensors but the embedding, in float32 rows."""
    from checkpoints import random_official_state_dict, write_pth
    from rwkvcpu.quant.convert import convert
    pth = tmp_path / "m.pth"
    write_pth(pth, random_official_state_dict("v7", 2, 256, 65536, seed=3))
    path = tmp_path / "m.safetensors"
    convert(pth, path, dtype="fp32", progress=False)
    stream = bench.WeightStream(path)
    per_token = bench.weight_bytes_per_token(path)
    # Only whole 64 KB rows of each merged region are read: at most one row short per region.
    assert per_token - len(stream.views) * 4 * stream._ROW <= stream.nbytes <= per_token
    # A figure, not a speed check: the machine may be slow or busy (no timing thresholds in tests).
    bandwidth = stream.bandwidth(repeats=1)
    assert np.isfinite(bandwidth) and bandwidth > 0


@pytest.mark.parametrize("args", [["-n", "0"], ["--prompt", "0"], ["-n", "-3"]])
def test_bench_rejects_zero_tokens(tiny_v7_file, args, capsys):
    from rwkvcpu.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_v7_file), *args])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    assert out.err == "error: --tokens and --prompt must be at least 1\n"


def test_weight_bytes_per_token_counts_one_embedding_row(tiny_v7_file):
    from rwkvcpu.io import read_header
    header, _ = read_header(tiny_v7_file)
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    vocab = header["emb.weight"]["shape"][0]
    assert bench.weight_bytes_per_token(tiny_v7_file) == sum(sizes.values()) - sizes["emb.weight"] + sizes["emb.weight"] // vocab


def test_memory_bandwidth_is_positive():
    bandwidth = bench.memory_bandwidth(1, megabytes=8, repeats=2)
    assert np.isfinite(bandwidth) and bandwidth > 0


def test_roofline():
    r = bench.roofline({"weight_bytes_per_token": 1e9, "decode_ms": 100.0}, 20e9)
    assert r["roofline_ms"] == pytest.approx(50.0) and r["roofline_pct"] == pytest.approx(50.0)
    assert np.isclose(r["bandwidth_gbs"], 20.0)


def test_bench_refuses_other_checkpoints_in_one_line(tmp_path):
    """bench's figures are the file's (its size, the bytes a token reads, streamed for the
    bandwidth): a .pth, a foreign safetensors file or a folder is refused with the way out."""
    import subprocess
    import sys
    from pathlib import Path
    from checkpoints import random_official_state_dict, write_pth
    rwkvcpu_exe = str(Path(sys.executable).parent / "rwkvcpu")
    pth = tmp_path / "some.pth"
    write_pth(pth, random_official_state_dict("v7", 2, 64, 256, seed=1))
    foreign = tmp_path / "hf.safetensors"
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(4, np.float32)}, str(foreign))
    folder = tmp_path / "folder"
    folder.mkdir()
    for src, dst in ((pth, "some-int8.safetensors"), (foreign, "hf-int8.safetensors"),
                     (folder, "folder-int8.safetensors")):
        p = subprocess.run([rwkvcpu_exe, "bench", str(src)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr == (f"error: {src}: bench measures an rwkvcpu .safetensors file: "
                            f"convert it first with rwkvcpu convert {src} {dst} --dtype int8\n")
