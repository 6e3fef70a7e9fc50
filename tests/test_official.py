"""Official-layout .pth fixtures of every generation (random weights at the
official names, shapes and dtypes, built at test time): they convert, the
canonical tensors are the documented transforms of the source, and the
reference `rwkv` package reads the same values from the same files."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import requires_oracle
from rwkvcpu.config import GENERATIONS
from rwkvcpu.quant.convert import convert, read_checkpoint
from checkpoints import official_tensors, random_official_state_dict, write_pth

# Small but not degenerate: 3 layers, 4 heads of 32 (v4: no heads), vocabulary 256.
DIMS = dict(n_layer=3, n_embd=128, vocab_size=256, head_size=32)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """{generation: (path of a bf16 .pth, its state dict as float32)}."""
    root = tmp_path_factory.mktemp("official")
    out = {}
    for i, gen in enumerate(GENERATIONS):
        sd = random_official_state_dict(gen, seed=i, **DIMS)
        out[gen] = (write_pth(root / f"{gen}.pth", sd), sd)
    return out


@pytest.mark.parametrize("gen", GENERATIONS)
def test_random_state_dict_matches_official_table(gen):
    sd = random_official_state_dict(gen, **DIMS)
    table = official_tensors(gen, **DIMS)
    assert list(sd) == list(table)
    assert {k: v.shape for k, v in sd.items()} == table
    # Every value is a bf16 number, so the bf16 file holds it exactly.
    for v in sd.values():
        assert (v.view(np.uint32) & 0xFFFF).max() == 0


def _ln(x, w, b):
    x = x.astype(np.float64)
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    return ((x - mu) / np.sqrt(var + 1e-5) * w + b).astype(np.float32)


def documented(gen, sd, name):
    """The canonical tensor `name`, computed from the official state dict as
    docs/FORMAT.md describes (an independent rendering of the table)."""
    H, S = DIMS["n_embd"] // DIMS["head_size"], DIMS["head_size"]
    f32 = np.float32
    if name == "emb.weight":
        return _ln(sd["emb.weight"], sd["blocks.0.ln0.weight"].astype(np.float64),
                   sd["blocks.0.ln0.bias"].astype(np.float64))
    if not name.startswith("blocks."):
        return sd[name]
    i, rel = name.split(".", 2)[1:]
    p = f"blocks.{i}."

    def src(k):
        return sd[p + k]

    if ".time_maa_" in rel and gen != "v6":
        part, c = rel.split(".time_maa_")
        return (f32(1) - src(f"{part}.time_mix_{c}")).reshape(-1)
    if rel == "att.log_decay":
        return (-np.exp(src("att.time_decay").astype(np.float64))).astype(f32)
    if rel == "att.decay":
        w = np.exp(-np.exp(src("att.time_decay").astype(np.float64))).astype(f32)
        return np.repeat(w, S) if w.size == H else w.reshape(-1)
    if rel == "att.bonus":
        if gen == "v4":
            return src("att.time_first")
        if gen == "v5.0":
            return np.repeat(np.exp(src("att.time_first").astype(np.float64)).astype(f32), S)
        u = src("att.time_faaaa")
        return np.repeat(u, S) if u.size == H else u.reshape(-1)
    if rel in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2") or (
            gen == "v7" and rel[4:] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")):
        return src(rel).T
    if rel == "att.time_maa_w2":
        return src(rel).transpose(0, 2, 1)
    if rel == "att.time_state":
        return src(rel).transpose(0, 2, 1) if gen != "v7" else src(rel)
    x = src(rel)
    return x.reshape(-1) if x.ndim != 2 or rel == "att.r_k" else x


@pytest.mark.parametrize("gen", GENERATIONS)
def test_fp32_round_trip_is_exactly_the_documented_transforms(official_files, gen):
    path, sd = official_files[gen]
    meta, tensors = read_checkpoint(path, dtype="fp32")
    assert meta["generation"] == gen
    assert float(meta["group_norm_eps"]) == 64e-5
    assert meta["tokenizer"] == "bytes"
    for name, got in tensors.items():
        want = documented(gen, sd, name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.abs(got - want).max() == 0.0, name
    # Every official tensor went somewhere (v7's layer-0 value residual excepted).
    assert len(tensors) == len(sd) - 2 - (3 if gen == "v7" else 0)


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_every_generation_converts_to_every_dtype(official_files, tmp_path, gen, dtype):
    from safetensors.numpy import load_file

    path, _ = official_files[gen]
    meta = convert(path, tmp_path / "out.safetensors", dtype=dtype, progress=False)
    assert meta["dtype"] == dtype and meta["generation"] == gen
    on_disk = load_file(tmp_path / "out.safetensors")
    _, in_memory = read_checkpoint(path, dtype=dtype)
    assert set(on_disk) == set(in_memory)
    for k, v in in_memory.items():
        assert on_disk[k].dtype == v.dtype and np.array_equal(on_disk[k], v), k


def test_time_state_in_checkpoint_is_converted(tmp_path):
    for gen in ("v5.2", "v6", "v7"):
        sd = random_official_state_dict(gen, time_state=True, **DIMS)
        write_pth(tmp_path / f"{gen}.pth", sd)
        _, t = read_checkpoint(tmp_path / f"{gen}.pth", dtype="fp32")
        for i in range(DIMS["n_layer"]):
            name = f"blocks.{i}.att.time_state"
            assert np.abs(t[name] - documented(gen, sd, name)).max() == 0.0


# The reference package transforms checkpoints on load; its internal tensors
# are an oracle for ours. Each family group runs in a child process because
# the package picks v7 support at import time from RWKV_V7_ON.
_ORACLE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    jobs = json.loads(sys.argv[1])
    os.environ["RWKV_JIT_ON"] = "0"
    if any(j["gen"] == "v7" for j in jobs):
        os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV
    for j in jobs:
        m = RWKV(j["pth"][:-4], "cpu fp32", **({} if j["gen"] == "v7" else {"verbose": False}))
        w = m.z if j["gen"] == "v7" else m.w
        np.savez(j["out"], **{k: v.float().numpy() for k, v in w.items() if v.numel()})
""")


@requires_oracle
def test_reference_package_sees_the_same_values(tmp_path):
    """Our canonical tensors against the reference package's own transformed tensors."""
    jobs = {}
    for i, gen in enumerate(GENERATIONS):
        sd = random_official_state_dict(gen, seed=10 + i, **DIMS)
        # fp32 files: the package folds ln0 into emb in the file's dtype.
        pth = write_pth(tmp_path / f"{gen}.pth", sd, dtype="fp32")
        jobs[gen] = {"gen": gen, "pth": str(pth), "out": str(tmp_path / f"{gen}.npz")}
    groups = ([j for g, j in jobs.items() if g != "v7"], [jobs["v7"]])
    procs = [subprocess.Popen([sys.executable, "-c", _ORACLE, json.dumps(group)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for group in groups]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    H, S = DIMS["n_embd"] // DIMS["head_size"], DIMS["head_size"]
    for gen, job in jobs.items():
        ref = dict(np.load(job["out"]))
        _, ours = read_checkpoint(job["pth"], dtype="fp32")
        checked = 0
        for name, got in ours.items():
            want = _reference_view(gen, ref, name, H, S)
            if want is None:
                continue
            tol = 2e-6 * max(1.0, float(np.abs(want).max()))
            assert got.shape == want.shape, (gen, name)
            assert np.abs(got - want).max() <= tol, (gen, name, np.abs(got - want).max())
            checked += 1
        assert checked == len(ours), gen


def _reference_view(gen, ref, name, H, S):
    """Our canonical tensor as the reference package holds it (or None)."""
    if name in ("emb.weight", "ln_out.weight", "ln_out.bias"):
        return ref[name]
    if name == "head.weight":
        return ref[name].T
    i, rel = name.split(".", 2)[1:]
    p = f"blocks.{i}."
    if rel.endswith(".weight") and rel.split(".")[-2] in ("key", "value", "receptance", "gate", "output"):
        return ref[p + rel].T
    if gen == "v7":
        if rel[4:] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            return ref[p + rel].T
        return ref[p + rel].reshape(-1)
    if ".time_maa_" in rel and gen != "v6":
        part, c = rel.split(".time_maa_")
        return 1 - ref[f"{p}{part}.time_mix_{c}"].reshape(-1)
    if rel in ("att.log_decay", "att.decay"):
        w = ref[p + "att.time_decay"].reshape(-1)
        return np.repeat(w, S) if w.size == H else w
    if rel == "att.bonus":
        u = ref[p + "att.time_first"].reshape(-1)
        return np.repeat(u, S) if u.size == H else u
    if rel in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2"):
        return ref[p + rel].T
    if rel == "att.time_maa_w2":
        return ref[p + rel].transpose(0, 2, 1)
    if gen == "v6" and rel == "att.time_decay":
        return ref[p + rel].reshape(-1)
    return ref[p + rel].reshape(-1)
