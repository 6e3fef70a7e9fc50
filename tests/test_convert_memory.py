"""Converting holds at most the source plus a few of its largest tensors, never two full copies.

The conversion runs in a child process and reports its own peak RSS; a second
child that imports the same modules and converts nothing gives the baseline.
The peak is read from /proc/self/status (VmHWM), not from getrusage:
ru_maxrss (RUSAGE_SELF in the child as RUSAGE_CHILDREN in the parent) keeps
the high-water mark of the process that forked the child across exec, so a
large pytest process would hide the conversion behind its own size.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvcpu.config import ModelConfig
from rwkvcpu.io import read_header
from rwkvcpu.layouts import expected_tensors
from checkpoints import iter_random_official, write_pth

HAS_VMHWM = Path("/proc/self/status").is_file() and "VmHWM:" in Path("/proc/self/status").read_text()

# Imports the modules named in argv[1] (JSON), converts argv[2] to argv[3] when
# given, then prints its peak RSS in bytes and the modules it has loaded.
CHILD = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
if len(sys.argv) > 2:
    from rwkvcpu.quant.convert import convert
    convert(sys.argv[2], sys.argv[3], dtype="int8", tokenizer="bytes", progress=False)
with open("/proc/self/status") as f:
    peak_kb = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
print(json.dumps({"peak": peak_kb * 1024, "modules": sorted(m for m in sys.modules if m != "__main__")}))
"""


def run_child(*args):
    p = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.skipif(not HAS_VMHWM, reason="needs Linux's /proc/self/status (VmHWM) for one process's "
                                           "peak RSS; ru_maxrss includes the parent's")
def test_peak_memory_stays_under_source_plus_four_largest_tensors(tmp_path):
    # v7, 6 layers of width 640, vocabulary 4096: a 71 MB bf16 file whose largest tensor
    # (the 4096 x 640 embedding) is 10 MB in fp32. One full fp32 copy (141 MB) would
    # already break the bound (71 + 40 MB); two copies of the source would too.
    shape = dict(generation="v7", n_layer=6, n_embd=640, vocab_size=4096)
    src = write_pth(tmp_path / "big.pth", iter_random_official(**shape))
    largest_fp32 = max(4 * a.size for _, a in iter_random_official(**shape))
    dst = tmp_path / "big-int8.safetensors"

    converting = run_child("[]", src, dst)
    baseline = run_child(json.dumps(converting["modules"]))
    assert set(converting["modules"]) <= set(baseline["modules"])
    used = converting["peak"] - baseline["peak"]
    bound = src.stat().st_size + 4 * largest_fp32
    print(f"peak RSS: converting {converting['peak'] / 2**20:.1f} MiB, baseline {baseline['peak'] / 2**20:.1f} MiB, "
          f"difference {used / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert used <= bound, f"converting used {used / 2**20:.1f} MiB over the baseline, bound {bound / 2**20:.1f} MiB"
    # The measurement saw the work: a converter holds at least the largest tensor as read (bf16).
    assert used >= largest_fp32 // 2

    # And the work was done: an int8 file with every tensor of the model.
    header, _ = read_header(dst)
    meta = header.pop("__metadata__")
    assert meta["dtype"] == "int8" and meta["generation"] == "v7"
    config = ModelConfig.from_metadata(meta)
    assert (config.n_layer, config.n_embd, config.vocab_size) == (6, 640, 4096)
    stems = {k.removesuffix(".scale").removesuffix(".min") for k in header}
    assert stems == set(expected_tensors(config, include_optional=False))
    assert header["blocks.0.ffn.key.weight"]["dtype"] == "I8"
