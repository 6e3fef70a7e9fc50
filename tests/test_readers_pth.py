"""Torch-free .pth reader: dtypes, layouts, and the restricted unpickler."""

import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import requires_oracle
from rwkvcpu.errors import ModelFormatError, UnsafePickleError
from checkpoints import to_bf16, write_pth
from rwkvcpu.quant.readers.pth import PthSource, scan_globals


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"emb.weight": rng.normal(size=(16, 8)).astype(np.float32),
            "blocks.0.att.time_mix_k": rng.uniform(size=(1, 1, 8)).astype(np.float32),
            "scalar_like": rng.normal(size=(1,)).astype(np.float32)}


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_round_trip_each_dtype(tmp_path, dtype):
    arrays = _arrays()
    write_pth(tmp_path / "m.pth", arrays, dtype=dtype)
    rounded = {"bf16": to_bf16, "fp16": lambda a: a.astype(np.float16).astype(np.float32),
               "fp32": lambda a: a}[dtype]
    with PthSource(tmp_path / "m.pth") as src:
        assert list(src.tensors()) == list(arrays)
        for name, a in arrays.items():
            got = src.load(name)
            assert got.dtype == np.float32 and got.shape == a.shape
            assert np.abs(got - rounded(a)).max() == 0.0, name
            assert src.info(name).dtype == {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]


def test_bf16_is_high_half_of_fp32(tmp_path):
    # 1.0078125 = 1 + 2^-7 is exactly representable in bf16; 1 + 2^-9 rounds to 1.
    write_pth(tmp_path / "b.pth", {"x": np.array([1.0078125, 1 + 2 ** -9, -2.5], np.float32)}, dtype="bf16")
    with PthSource(tmp_path / "b.pth") as src:
        assert src.load("x").tolist() == [1.0078125, 1.0, -2.5]


@requires_oracle
def test_reads_torch_save_including_views(tmp_path):
    import torch
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"bf": base.to(torch.bfloat16), "half": base.half(), "t": base.t(),      # non-contiguous
          "row": base[2], "slice": base[:, 1:3]}                                # shared storage, offsets
    torch.save(sd, tmp_path / "t.pth")
    with PthSource(tmp_path / "t.pth") as src:
        for name, t in sd.items():
            assert np.abs(src.load(name) - t.float().numpy()).max() == 0.0, name


@requires_oracle
def test_torch_loads_our_files(tmp_path):
    import torch
    arrays = _arrays(3)
    for dtype, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        write_pth(tmp_path / f"{dtype}.pth", arrays, dtype=dtype)
        for mmap in (False, True):
            z = torch.load(tmp_path / f"{dtype}.pth", map_location="cpu", weights_only=True, mmap=mmap)
            assert list(z) == list(arrays)
            for name, a in arrays.items():
                assert z[name].dtype == tdt and tuple(z[name].shape) == a.shape
                ours = PthSource(tmp_path / f"{dtype}.pth").load(name)
                assert np.abs(z[name].float().numpy() - ours).max() == 0.0


def _pth_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _evil_payloads(marker):
    cmd = f"{sys.executable} -c \"open({str(marker)!r}, 'w').close()\""
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": pickle.dumps({"emb.weight": _Evil(os.system, cmd)}, protocol=2),
        "os.system-protocol4": pickle.dumps({"x": _Evil(os.system, cmd)}, protocol=4),
        "builtins.exec": pickle.dumps(_Evil(exec, code), protocol=2),
        "builtins.eval": pickle.dumps(_Evil(eval, code), protocol=3),
        "subprocess.call": pickle.dumps(_Evil(subprocess.call, ["touch", str(marker)]), protocol=2),
    }


@pytest.mark.parametrize("which", ["os.system", "os.system-protocol4", "builtins.exec",
                                   "builtins.eval", "subprocess.call"])
def test_malicious_pickle_refused_before_running(tmp_path, which):
    marker = tmp_path / "pwned"
    payload = _evil_payloads(marker)[which]
    # The payload really would run: check it on a plain unpickler first, in a child process.
    _pth_with_pickle(tmp_path / "evil.pth", payload)
    with pytest.raises(UnsafePickleError, match="refusing"):
        PthSource(tmp_path / "evil.pth")
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=False, capture_output=True)
    assert marker.exists(), "the test payload should be live when unpickled without restrictions"


def test_dynamic_global_name_refused(tmp_path):
    # STACK_GLOBAL with its module name built by a REDUCE (not a literal string).
    payload = (pickle.PROTO + b"\x04"
               + pickle.GLOBAL + b"builtins\nstr\n" + pickle.SHORT_BINUNICODE + b"\x02os"
               + pickle.TUPLE1 + pickle.REDUCE
               + pickle.SHORT_BINUNICODE + b"\x06system" + pickle.STACK_GLOBAL + pickle.STOP)
    with pytest.raises(UnsafePickleError):
        scan_globals(payload, "x.pth")


def test_storage_load_from_bytes_refused(tmp_path):
    payload = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch.storage\n_load_from_bytes\n" + pickle.STOP
    _pth_with_pickle(tmp_path / "b.pth", payload)
    with pytest.raises(UnsafePickleError, match="torch.storage._load_from_bytes"):
        PthSource(tmp_path / "b.pth")


def test_truncated_and_corrupt(tmp_path):
    write_pth(tmp_path / "m.pth", _arrays())
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="cut.pth"):
        PthSource(tmp_path / "cut.pth")
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w") as zf:
        zf.writestr("something/else.txt", "hi")
    (tmp_path / "other.zip").write_bytes(bio.getvalue())
    with pytest.raises(ModelFormatError, match="data.pkl"):
        PthSource(tmp_path / "other.zip")


def test_non_tensor_entries_refused(tmp_path):
    _pth_with_pickle(tmp_path / "n.pth", pickle.dumps({"emb.weight": 3}, protocol=2))
    with pytest.raises(ModelFormatError, match="'emb.weight' is a int"):
        PthSource(tmp_path / "n.pth")


@requires_oracle
def test_state_dict_of_a_module_and_other_dtypes(tmp_path):
    import torch
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    torch.save(m.state_dict(), tmp_path / "sd.pth")        # an OrderedDict with _metadata
    with PthSource(tmp_path / "sd.pth") as src:
        assert np.abs(src.load("0.weight") - m.state_dict()["0.weight"].float().numpy()).max() == 0.0
    torch.save({"d": torch.arange(3, dtype=torch.float64)}, tmp_path / "f64.pth")
    with PthSource(tmp_path / "f64.pth") as src:
        assert src.load("d").tolist() == [0.0, 1.0, 2.0]
    torch.save({"step": torch.zeros(3, dtype=torch.int64)}, tmp_path / "i.pth")
    with pytest.raises(ModelFormatError, match="int64 tensors"):
        PthSource(tmp_path / "i.pth")


def test_format_doc_lists_every_allowed_global():
    """docs/FORMAT.md names exactly the globals the restricted unpickler allows."""
    import re
    from pathlib import Path

    from rwkvcpu.quant.readers.pth import ALLOWED
    doc = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    section = doc.split("### Official `.pth` without torch", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"`((?:torch|collections)[\w.]*)\.(\w+)`", section))
    assert listed == set(ALLOWED)
