"""Hostile and broken model files (issue 11), case by case: no crash, no hang, no memory
bomb, no silent NaN.

Every case runs in a child process with a memory limit and a timeout (tests/sandbox.py)
and must keep the promise checked by hostile_files.broken_promise: one line naming the
file and the problem (exit code 2, or an RwkvCpuError from the API), nothing left at a
conversion's destination, no warning on the terminal. tests/test_fuzz_files.py draws
many more cases of the same classes; docs/HOSTILE_INPUT.md lists the classes.
"""

import json
import os
import zlib

import numpy as np
import pytest

from hostile_files import (broken_promise, memo_bomb_pickle, nested_dicts_pickle, official_state_dict,
                           opcode_flood_pickle, pth_bytes, pth_of, shared_dicts_pickle, st_bytes, st_parse,
                           with_nonfinite, ggml_bytes, ggml_parse)
from rwkvcpu.errors import InvalidArgumentError, NonFiniteError

THREADS = ("--threads", "1")


def commands(path, tmp_path, seeds, *, ours=False):
    """(label, sandbox target, args, destination) of every command and call that reads a model file."""
    dst = tmp_path / "out.safetensors"
    cases = [("info", "cli", ["info", path], None),
             ("generate", "cli", ["generate", "-m", path, "-n", "2", *THREADS, "hi"], None),
             ("perplexity", "cli", ["perplexity", path, seeds.text, *THREADS], None),
             ("load", "load", [path], None),
             ("describe", "describe", [path], None)]
    if ours:
        cases.append(("bench", "cli", ["bench", path, "-n", "1", "--prompt", "1", "--no-bandwidth", *THREADS], None))
    else:
        cases.append(("convert", "cli", ["convert", path, dst], dst))
    return cases


def refused(report, fragment, names, dst=None, label=""):
    """Assert the promise is kept and the case was refused with `fragment` in its one line."""
    problem = broken_promise(report, [str(n) for n in names], dst)
    assert problem is None, f"{label}: {problem}"
    if report["error"] is not None:
        message = report["error"]["message"]
    else:
        assert report["exit"] == 2, f"{label}: accepted ({report['stdout'][:300]!r})"
        message = report["stderr"]
    assert fragment in message, f"{label}: {fragment!r} not in {message!r}"


def refused_everywhere(sandbox, path, fragment, tmp_path, seeds, ours=False, skip=()):
    for label, target, args, dst in commands(path, tmp_path, seeds, ours=ours):
        if label not in skip:
            refused(sandbox.run(target, [str(a) for a in args]), fragment, [path], dst, label)


# ------------------------------------------------------------------ 1. memory safety

@pytest.mark.parametrize("shape, stride, offset, fragment", [
    ((256, 64), (-64, 1), 0, "negative stride"),
    ((256, 64), (64, -1), 0, "negative stride"),
    ((256, 64), (64, 1), -5, "negative stride or offset"),
    ((100_000, 64), (0, 1), 0, "holds more elements than its storage"),
    ((256, 64), (64, 1), 63, "reaches past the end of its storage"),
    ((256, 64), (2**62, 1), 0, "reaches past the end of its storage"),
    ((256, 2**62), (64, 0), 0, "holds more elements than its storage"),
])
def test_pth_views_outside_their_storage(sandbox, seeds, tmp_path, shape, stride, offset, fragment):
    pth = pth_of(official_state_dict("v7"))
    i = next(i for i, t in enumerate(pth.tensors) if t.name == "emb.weight")
    pth.tensors[i] = pth.tensors[i]._replace(shape=shape, stride=stride, offset=offset)
    path = tmp_path / "strided.pth"
    path.write_bytes(pth_bytes(pth))
    refused_everywhere(sandbox, path, fragment, tmp_path, seeds)


def test_pth_shape_and_offsets_that_are_not_integers(sandbox, seeds, tmp_path):
    pth = pth_of(official_state_dict("v7"))
    for field, value in (("shape", (256, "64")), ("stride", (64.0, 1)), ("offset", None), ("numel", -1)):
        t = pth.tensors[0]
        bad = pth._replace(tensors=[t._replace(**{field: value})] + pth.tensors[1:])
        path = tmp_path / f"{field}.pth"
        path.write_bytes(pth_bytes(bad))
        report = sandbox.run("cli", ["convert", str(path), str(tmp_path / "o.safetensors")])
        assert broken_promise(report, [str(path)], tmp_path / "o.safetensors") is None, (field, report)
        assert report["exit"] == 2, (field, report["stderr"])


# ------------------------------------------------------------------ 2. hangs

def test_named_pipes_are_refused_without_blocking(sandbox, seeds, tmp_path):
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    refused_everywhere(sandbox, fifo, "named pipe (FIFO), not a regular file", tmp_path, seeds,
                       skip=("perplexity",))
    refused(sandbox.run("cli", ["bench", str(fifo), "-n", "1"]), "", [fifo])
    model = str(seeds.ours[("v7", "fp32")])
    refused(sandbox.run("state_load", [str(fifo), model]), "named pipe", [fifo])
    refused(sandbox.run("cli", ["chat", "-m", model, "--load", str(fifo), *THREADS]), "named pipe", [fifo])
    dst = tmp_path / "o.safetensors"
    refused(sandbox.run("cli", ["convert", str(seeds.pth["v7"]), str(dst), "--state", str(fifo)]),
            "named pipe", [fifo], dst)
    # A text file may be a pipe (a shell's <(zcat book.gz)); one nobody writes to is empty, at once.
    refused(sandbox.run("cli", ["perplexity", model, str(fifo), *THREADS]), "the text file is empty", [fifo])


def test_devices_are_refused(sandbox, seeds, tmp_path):
    for device in ("/dev/zero", "/dev/null"):
        refused(sandbox.run("cli", ["info", device]), "character device", [device])
        refused(sandbox.run("load", [device]), "character device", [device])


def test_rwkv_cpp_dimensions_past_2_to_63(sandbox, seeds, tmp_path):
    g = ggml_parse(next(iter(seeds.ggml.values())).read_bytes())
    t = g.tensors[0]
    g.tensors[0] = t._replace(ne=(2**31 - 1,) * 4)
    path = tmp_path / "huge-dims.bin"
    path.write_bytes(ggml_bytes(g))
    refused_everywhere(sandbox, path, "truncated in tensor", tmp_path, seeds)


# ------------------------------------------------------------------ 3. bombs from tiny files

def test_one_stray_layer_key(sandbox, seeds, tmp_path):
    sd = official_state_dict("v7")
    sd["blocks.99999999999.ln1.weight"] = np.ones(64, np.float32)
    path = tmp_path / "stray.pth"
    path.write_bytes(pth_bytes(pth_of(sd)))
    refused_everywhere(sandbox, path, "blocks.2.ln1.weight is missing", tmp_path, seeds)


def _with_metadata(src, dst, **changes):
    header, data = st_parse(src.read_bytes())
    header["__metadata__"].update(changes)
    dst.write_bytes(st_bytes(header, data))
    return dst


def test_metadata_layer_count_of_a_billion(sandbox, seeds, tmp_path):
    path = _with_metadata(seeds.ours[("v7", "int8")], tmp_path / "billion.safetensors", n_layer=str(10**9))
    refused_everywhere(sandbox, path, "1,000,000,000 layers", tmp_path, seeds, ours=True, skip=("info", "describe"))
    report = sandbox.run("cli", ["info", str(path)])
    assert broken_promise(report, [str(path)]) is None
    assert "loads:" in report["stdout"] and "no: " in report["stdout"].split("loads:")[1]


@pytest.mark.parametrize("case, fragment", [
    ("shared", "shared or cyclic"),
    ("shared40", "nested more than"),
    ("deep", "nested more than"),
    ("memo", "memo index"),
    ("flood", "opcodes"),
    ("zipbomb", "its pickle (data.pkl) is 50,000,004 bytes"),
])
def test_pickle_bombs(sandbox, seeds, tmp_path, case, fragment):
    pth = pth_of(official_state_dict("v7"))
    data_pkl = {"shared": lambda: shared_dicts_pickle(3), "shared40": lambda: shared_dicts_pickle(40),
                "deep": lambda: nested_dicts_pickle(100_000),
                "memo": memo_bomb_pickle, "flood": lambda: opcode_flood_pickle(3_000_000),
                "zipbomb": lambda: opcode_flood_pickle(50_000_000)}[case]()
    path = tmp_path / f"{case}.pth"
    path.write_bytes(pth_bytes(pth, data_pkl=data_pkl, compress_pickle=True))
    assert path.stat().st_size < 4 << 20
    for label, target, args, dst in commands(path, tmp_path, seeds):
        report = sandbox.run(target, [str(a) for a in args], timeout=10)
        refused(report, fragment, [path], dst, label)
        assert report["seconds"] < 5, (label, report["seconds"])


# ------------------------------------------------------------------ 4. malformed safetensors headers

def _edit_header(src, dst, edit):
    header, data = st_parse(src.read_bytes())
    edit(header)
    dst.write_bytes(st_bytes(header, data))
    return dst


HEADER_CASES = {
    "negative shape": (lambda h: h["head.weight"].update(shape=[-256, -64]), "bad shape"),
    "overflowing shape": (lambda h: h["head.weight"].update(shape=[2**40, 2**40, 2**40]), "needs"),
    "string in shape": (lambda h: h["head.weight"].update(shape=["256", 64]), "bad shape"),
    "string in data_offsets": (lambda h: h["head.weight"].update(data_offsets=["0", 10]), "bad data_offsets"),
    "float in data_offsets": (lambda h: h["head.weight"].update(data_offsets=[0.0, 10.5]), "bad data_offsets"),
    "metadata not an object": (lambda h: h.update(__metadata__=["format", "rwkvcpu"]), "__metadata__"),
    "metadata value not a string": (lambda h: h.setdefault("__metadata__", {}).update(n_layer=2), "__metadata__"),
    "entry not an object": (lambda h: h.update({"head.weight": 7}), "malformed header entry"),
    "unknown dtype": (lambda h: h["head.weight"].update(dtype="Q4_K"), "unknown dtype"),
    "too many dimensions": (lambda h: h["head.weight"].update(shape=[1] * 40 + [256, 64]), "bad shape"),
    "offsets past the end": (lambda h: h["head.weight"].update(
        data_offsets=[o + 10**12 for o in h["head.weight"]["data_offsets"]]), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_safetensors_headers(sandbox, seeds, tmp_path, case):
    edit, fragment = HEADER_CASES[case]
    ours = _edit_header(seeds.ours[("v7", "fp32")], tmp_path / "ours.safetensors", edit)
    refused_everywhere(sandbox, ours, fragment, tmp_path, seeds, ours=True)
    # The converter's reader applies the same checks to a plain safetensors checkpoint.
    plain = _edit_header(seeds.hf["transformers"] / "model.safetensors", tmp_path / "plain.safetensors",
                         lambda h: (h.setdefault("head.weight", h["rwkv.embeddings.weight"]), edit(h)))
    dst = tmp_path / "o.safetensors"
    refused(sandbox.run("cli", ["convert", str(plain), str(dst)]), fragment, [plain], dst)


def test_overlapping_tensors_and_duplicate_keys(sandbox, seeds, tmp_path):
    src = seeds.ours[("v7", "fp32")]
    header, data = st_parse(src.read_bytes())
    overlap = dict(header, **{"ln_out.bias": dict(header["ln_out.bias"],
                                                   data_offsets=header["ln_out.weight"]["data_offsets"])})
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(st_bytes(overlap, data))
    refused_everywhere(sandbox, path, "share bytes of the file", tmp_path, seeds, ours=True)
    text = json.dumps(header)
    entry = json.dumps({"ln_out.bias": header["ln_out.bias"]})[1:-1]
    path = tmp_path / "duplicate.safetensors"
    path.write_bytes(st_bytes(text[:-1] + ", " + entry + "}", data))
    refused_everywhere(sandbox, path, "appears twice", tmp_path, seeds, ours=True)


def test_bench_token_counts_out_of_range(sandbox, seeds):
    model = str(seeds.ours[("v7", "int8")])
    for n in ("1e30", str(10**30), "-1"):
        report = sandbox.run("cli", ["bench", model, "-n", n, *THREADS])
        assert broken_promise(report, ["--tokens"]) is None and report["exit"] == 2, report
    report = sandbox.run("cli", ["bench", model, "--prompt", str(10**17), *THREADS])
    assert broken_promise(report, ["--prompt"]) is None and report["exit"] == 2, report


# ------------------------------------------------------------------ 5. accepted when it should be refused

@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan"), float("inf"), "abc", True])
def test_group_norm_eps_is_checked_by_load(seeds, eps):
    import rwkvcpu
    with pytest.raises(InvalidArgumentError, match="group-norm epsilon must be positive"):
        rwkvcpu.load(seeds.ours[("v7", "int8")], group_norm_eps=eps)


@pytest.mark.parametrize("changes, fragment", [
    ({"n_layer": "-1"}, "n_layer must be a positive integer"),
    ({"format_version": "99"}, "format version '99'"),
    ({"group_norm_eps": "nan"}, "group-norm epsilon must be positive"),
    ({"head_size": "0"}, "head size 0"),
    ({"lora_dims": "[1, 2]"}, "lora_dims"),
    ({"generation": "v9"}, "unknown generation"),
])
def test_info_says_when_a_file_will_not_load(sandbox, seeds, tmp_path, changes, fragment):
    path = _with_metadata(seeds.ours[("v7", "int8")], tmp_path / "bad.safetensors", **changes)
    report = sandbox.run("cli", ["info", str(path)])
    assert broken_promise(report, [str(path)]) is None
    loads = [line for line in report["stdout"].splitlines() if line.startswith("loads:")]
    assert len(loads) == 1 and "no: " in loads[0] and fragment in loads[0], report["stdout"]
    refused(sandbox.run("load", [str(path)]), fragment, [path])


@pytest.mark.parametrize("changes, fragment", [
    ({"tokenizer": "0"}, "unknown tokenizer '0'"),
    ({"tokenizer": "embedded"}, "embedded"),
    ({"eos_token_id": "9" * 5000}, "bad eos_token_id"),
    ({"tokenizer": "world"}, "65536 tokens but the model only 256 logits"),
])
def test_unusable_tokenizer_metadata(sandbox, seeds, tmp_path, changes, fragment):
    """Found by the fuzzer: the tokenizer loads lazily, and its errors did not name the file."""
    path = _with_metadata(seeds.ours[("v7", "int8")], tmp_path / "tok.safetensors", **changes)
    for label in ("generate", "perplexity"):
        args = next(args for lab, _, args, _ in commands(path, tmp_path, seeds, ours=True) if lab == label)
        report = sandbox.run("cli", [str(a) for a in args])
        refused(report, fragment, [path], label=label)
        assert len(report["stderr"]) < 400, report["stderr"]


def test_info_cuts_long_metadata_and_escapes_control_characters(sandbox, seeds, tmp_path):
    path = _with_metadata(seeds.ours[("v7", "int8")], tmp_path / "long.safetensors",
                          note="x" * 1_000_000, evil="\x1b[2J\nfake: row")
    report = sandbox.run("cli", ["info", str(path)])
    assert broken_promise(report, [str(path)]) is None and report["exit"] == 0
    lines = report["stdout"].splitlines()
    note = next(line for line in lines if line.startswith("note:"))
    assert len(note) < 300 and note.endswith("(1,000,000 characters)")
    evil = next(line for line in lines if line.startswith("evil:"))
    assert "\\x1b[2J\\nfake: row" in evil and not any(line.startswith("fake:") for line in lines)
    assert "\x1b" not in report["stdout"]


def test_hugging_face_folder_files_are_checked(sandbox, seeds, tmp_path):
    import shutil
    for case, edit, fragment in (
            ("architectures", lambda f: (f / "config.json").write_text('{"architectures": 5}'), "architectures"),
            ("norm_eps", lambda f: (f / "config.json").write_text('{"norm_eps": "small"}'), "norm_eps"),
            ("config list", lambda f: (f / "config.json").write_text("[1]"), "not an object"),
            ("shard outside", lambda f: (f / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"emb.weight": "../outside.safetensors"}})), "not a file name"),
            ("weight_map list", lambda f: (f / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": ["model.safetensors"]})), "weight_map"),
            ("deep json", lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000), "unreadable")):
        folder = tmp_path / case.replace(" ", "-")
        shutil.copytree(seeds.hf["fla"], folder)
        edit(folder)
        for label, target, args, dst in commands(folder, tmp_path, seeds):
            refused(sandbox.run(target, [str(a) for a in args]), fragment, [folder], dst, f"{case}/{label}")


# ------------------------------------------------------------------ 6. silent NaN

def _pth_with(tmp_path, name, value, generation="v7", index=0):
    sd = official_state_dict(generation)
    sd[name] = sd[name].copy()
    sd[name].reshape(-1)[index] = value
    path = tmp_path / f"{name}.pth"
    path.write_bytes(pth_bytes(pth_of(sd, "FloatStorage")))
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_refused_when_converting(sandbox, seeds, tmp_path, value):
    path = _pth_with(tmp_path, "blocks.1.att.key.weight", value, index=5)
    for label, target, args, dst in commands(path, tmp_path, seeds):
        if label in ("info", "describe"):
            continue        # info reads no weights
        refused(sandbox.run(target, [str(a) for a in args]),
                "tensor 'blocks.1.att.key.weight' holds NaN or infinite values", [path], dst, label)
    ln0 = _pth_with(tmp_path, "blocks.0.ln0.bias", value)
    dst = tmp_path / "o.safetensors"
    refused(sandbox.run("cli", ["convert", str(ln0), str(dst)]), "'blocks.0.ln0.bias' holds NaN", [ln0], dst)


def test_transforms_that_overflow_are_refused(sandbox, seeds, tmp_path):
    """Finite stored values that a transform (v4's -exp(w)) or the storage (an fp16 scale) cannot hold."""
    v4 = _pth_with(tmp_path, "blocks.0.att.time_decay", 200.0, generation="v4")
    dst = tmp_path / "o.safetensors"
    refused(sandbox.run("cli", ["convert", str(v4), str(dst)]), "overflows to NaN or infinity after neg_exp",
            [v4], dst)
    big = _pth_with(tmp_path, "blocks.0.ffn.key.weight", 1e30)
    for dtype in ("int8", "int4", "fp16"):
        refused(sandbox.run("cli", ["convert", str(big), str(dst), "--dtype", dtype]),
                f"after quantizing to {dtype}", [big], dst, dtype)


@pytest.mark.parametrize("dtype, part", [("fp32", "head.weight"), ("fp16", "head.weight"),
                                         ("int8", "head.weight.scale"), ("int4", "head.weight.min"),
                                         ("int8", "blocks.0.ln1.bias")])
def test_nonfinite_weights_refused_when_loading(sandbox, seeds, tmp_path, dtype, part):
    header, data = st_parse(seeds.ours[("v7", dtype)].read_bytes())
    entry = header[part]
    data = with_nonfinite(data, entry["data_offsets"][0] + 2 * (entry["dtype"] == "F32") * 0, entry["dtype"],
                          float("nan"))
    path = tmp_path / "nan.safetensors"
    path.write_bytes(st_bytes(header, data))
    refused_everywhere(sandbox, path, f"tensor '{part}' holds NaN or infinite values", tmp_path, seeds, ours=True,
                       skip=("info", "describe"))


def _overflowing_model(seeds, tmp_path):
    """An fp32 file whose head.weight is +-3e38: finite (it loads), but its logits overflow."""
    header, data = st_parse(seeds.ours[("v7", "fp32")].read_bytes())
    begin, end = header["head.weight"]["data_offsets"]
    big = np.full((end - begin) // 4, 3e38, "<f4")
    big[::2] *= -1
    data = data[:begin] + big.tobytes() + data[end:]
    path = tmp_path / "overflow.safetensors"
    path.write_bytes(st_bytes(header, data))
    return path


def test_logits_that_overflow_at_run_time(sandbox, seeds, tmp_path):
    """Finite weights (the file loads) whose logits overflow: said in one line, biases not blamed."""
    path = _overflowing_model(seeds, tmp_path)
    for label, target, args, dst in commands(path, tmp_path, seeds, ours=True):
        report = sandbox.run(target, [str(a) for a in args])
        if label in ("info", "describe"):
            assert broken_promise(report, [str(path)]) is None
            continue
        refused(report, "NaN or infinite logits", [path], dst, label)
        assert "bias" not in (report["stderr"] + str(report["error"])), label


def test_overflow_in_a_batch_fails_its_own_sequence(seeds, tmp_path):
    """forward and forward_batch raise; step returns the row as it is, for the sampler to refuse for
    that sequence alone (the scheduler drops only its request)."""
    import rwkvcpu
    from rwkvcpu.sampling import Sampler, SamplingParams
    model = rwkvcpu.load(_overflowing_model(seeds, tmp_path), threads=1)
    with pytest.raises(NonFiniteError, match="overflow.safetensors: the model computed NaN or infinite logits"):
        model.forward([1, 2])
    with pytest.raises(NonFiniteError):
        model.forward_batch([[1], [2]])
    pool = model.state_pool(1)
    row = model.step(pool, [(pool.acquire(), [1])])[0]
    assert not np.isfinite(row).all()
    with pytest.raises(NonFiniteError, match="the model's logits are NaN or infinite"):
        Sampler(SamplingParams(), model.config.vocab_size).sample(row)


def test_sampler_names_only_what_the_caller_set():
    from rwkvcpu.sampling import Sampler, SamplingParams
    nan = np.full(8, np.nan, np.float32)
    with pytest.raises(NonFiniteError, match="the model's logits are NaN or infinite"):
        Sampler(SamplingParams(), 8).sample(nan)
    with pytest.raises(InvalidArgumentError, match="after the logit biases and banned tokens"):
        Sampler(SamplingParams(logit_bias={i: -np.inf for i in range(8)}), 8).sample(np.zeros(8, np.float32))


def test_numpy_warnings_never_reach_the_terminal(sandbox, seeds, tmp_path):
    path = _pth_with(tmp_path, "head.weight", float("nan"))
    report = sandbox.run("cli", ["convert", str(path), str(tmp_path / "o.safetensors"), "--dtype", "int4"])
    assert "Warning" not in report["stderr"] and report["exit"] == 2, report["stderr"]


# ------------------------------------------------------------------ 7. small ones

def test_generate_accepts_ignore_eos():
    from generate_fakes import FakeModel
    from rwkvcpu.generate import generate
    model = FakeModel("ab", end_of_text=True, tokenizer="world")
    stopped = generate(model, "ab", temperature=0, max_tokens=10)
    assert "".join(stopped) == "" and stopped.finish_reason == "stop_token"
    going = generate(model, "ab", temperature=0, max_tokens=10, ignore_eos=True)
    "".join(going)
    assert going.finish_reason == "length" and len(going.tokens) == 10
    with pytest.raises(InvalidArgumentError, match="ignore_eos"):
        generate(model, "ab", ignore_eos="yes")


def test_pickle_scan_bounds_are_checked_before_unpickling():
    """The bounds hold on the pickle alone (no zip): a memo index that jumps, and too many opcodes."""
    from rwkvcpu.errors import ModelFormatError
    from rwkvcpu.quant.readers.pth import MAX_PICKLE_OPS, load_pickle
    with pytest.raises(ModelFormatError, match="memo index 1073741824 after 0 entries"):
        load_pickle(memo_bomb_pickle(), "m.pth")
    with pytest.raises(ModelFormatError, match=f"more than {MAX_PICKLE_OPS:,} opcodes"):
        load_pickle(opcode_flood_pickle(MAX_PICKLE_OPS + 10), "m.pth")
    assert zlib.compress(opcode_flood_pickle(50_000_000), 9).__len__() < 200_000
