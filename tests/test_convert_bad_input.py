"""Bad input to `rwkvcpu convert` / `info`: one line naming the problem and the file,
exit code 2, no traceback, and nothing left at DST."""

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model_path
from test_convert import byte_tokenizer_json
from checkpoints import random_official_state_dict, write_pth

RWKVCPU = str(Path(sys.executable).parent / "rwkvcpu")


def run_cli(args, capsys):
    from rwkvcpu.cli.main import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])


def assert_nothing_at(dst):
    assert not dst.exists()
    leftovers = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]
    assert leftovers == []


@pytest.fixture
def small_pth(tmp_path):
    sd = random_official_state_dict("v6", n_layer=2, n_embd=64, vocab_size=256, head_size=32)
    return write_pth(tmp_path / "small.pth", sd), sd


def assert_convert_refuses_truncated(tmp_path, capsys, name):
    dst = tmp_path / f"{name}.safetensors"
    code, _, err = run_cli(["convert", tmp_path / name, dst], capsys)
    assert_one_line_error(code, err, name)
    assert "truncated" in err
    assert_nothing_at(dst)


def test_truncated_pth(tmp_path, capsys, small_pth):
    pth_data = small_pth[0].read_bytes()
    (tmp_path / "cut.pth").write_bytes(pth_data[: len(pth_data) - 300])
    assert_convert_refuses_truncated(tmp_path, capsys, "cut.pth")


def test_truncated_rwkv_cpp_file(tmp_path, capsys):
    data = tiny_model_path("v6", "FP32").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) * 2 // 3])
    assert_convert_refuses_truncated(tmp_path, capsys, "cut.bin")


def assert_convert_and_info_refuse(tmp_path, capsys, names):
    for name in names:
        dst = tmp_path / "out.safetensors"
        code, _, err = run_cli(["convert", tmp_path / name, dst], capsys)
        assert_one_line_error(code, err, name)
        assert_nothing_at(dst)
        code, _, err = run_cli(["info", tmp_path / name], capsys)
        assert_one_line_error(code, err, name)


def test_random_bytes_and_empty_file(tmp_path, capsys):
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    assert_convert_and_info_refuse(tmp_path, capsys, ("random.bin", "empty.pth"))


def test_wrong_magic(tmp_path, capsys):
    data = bytearray(tiny_model_path("v4", "FP16").read_bytes())
    data[:4] = b"ggjt"
    (tmp_path / "magic.bin").write_bytes(bytes(data))
    assert_convert_and_info_refuse(tmp_path, capsys, ("magic.bin",))


class _Payload:
    def __init__(self, marker):
        self.cmd = f"{sys.executable} -c \"open({str(marker)!r}, 'w').close()\""

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_does_not_run(tmp_path, capsys):
    marker = tmp_path / "created-by-pickle"
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"emb.weight": _Payload(marker)}, protocol=2))
    dst = tmp_path / "out.safetensors"
    for args in (["convert", tmp_path / "evil.pth", dst], ["info", tmp_path / "evil.pth"]):
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, "evil.pth", "system")
        assert not marker.exists()
    assert_nothing_at(dst)


def test_missing_and_misshapen_tensors(tmp_path, capsys, small_pth):
    _, sd = small_pth
    missing = dict(sd)
    del missing["blocks.1.att.key.weight"]
    write_pth(tmp_path / "missing.pth", missing)
    bad = dict(sd)
    bad["blocks.0.ffn.value.weight"] = bad["blocks.0.ffn.value.weight"][:, :100]
    write_pth(tmp_path / "misshapen.pth", bad)
    for name, frag in (("missing.pth", "blocks.1.att.key.weight is missing"),
                       ("misshapen.pth", "blocks.0.ffn.value.weight has shape (64, 100), expected (64, 224)")):
        dst = tmp_path / "out.safetensors"
        code, _, err = run_cli(["convert", tmp_path / name, dst], capsys)
        assert_one_line_error(code, err, name, frag)
        # the tensor is named once, not again as what it is needed for
        assert err.count(frag.split()[0]) == 1, err
        assert_nothing_at(dst)


def test_unknown_dtype(tmp_path, capsys, small_pth):
    dst = tmp_path / "out.safetensors"
    code, _, err = run_cli(["convert", small_pth[0], dst, "--dtype", "int3"], capsys)
    assert_one_line_error(code, err, "int3", "fp32, fp16, int8, int4")
    assert_nothing_at(dst)


def test_missing_paths(tmp_path, capsys, small_pth):
    code, _, err = run_cli(["convert", tmp_path / "nope" / "m.pth", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "m.pth", "does not exist")
    code, _, err = run_cli(["info", tmp_path / "nope.pth"], capsys)
    assert_one_line_error(code, err, "nope.pth", "no such file")
    dst = tmp_path / "no-such-dir" / "o.safetensors"
    code, _, err = run_cli(["convert", small_pth[0], dst], capsys)
    assert_one_line_error(code, err, "no-such-dir", "does not exist")
    assert not dst.parent.exists()
    code, _, err = run_cli(["convert", tmp_path / "empty-dir-src", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "empty-dir-src")


def test_destination_is_source(tmp_path, capsys, small_pth):
    src, _ = small_pth
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    for dst in (src, tmp_path / "link.pth", tmp_path / "." / "small.pth"):
        code, _, err = run_cli(["convert", src, dst], capsys)
        assert_one_line_error(code, err, "is the source itself")
    assert src.read_bytes() == before


def test_full_disk_simulated(tmp_path, capsys, monkeypatch, small_pth):
    import rwkvcpu.quant.writer as writer
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", failing_pwrite)
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous contents")
    code, _, err = run_cli(["convert", small_pth[0], dst], capsys)
    assert_one_line_error(code, err, "out.safetensors", "no space left")
    # An existing destination is left as it was; no partial file anywhere.
    assert dst.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "posix_fallocate", no_room)
    dst2 = tmp_path / "out2.safetensors"
    code, _, err = run_cli(["convert", small_pth[0], dst2], capsys)
    assert_one_line_error(code, err, "out2.safetensors", "no space left")
    assert_nothing_at(dst2)


def test_full_disk_on_a_tiny_tmpfs(tmp_path, capsys, small_pth):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full-disk test covers this")
    try:
        dst = mnt / "out.safetensors"
        # the fp32 file (about 800 KB) cannot fit in 256 KB
        code, _, err = run_cli(["convert", small_pth[0], dst, "--dtype", "fp32"], capsys)
        assert_one_line_error(code, err, "out.safetensors", "no space left")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_ctrl_c_leaves_nothing(tmp_path, capsys, monkeypatch, small_pth):
    import rwkvcpu.quant.canonical as canonical
    real_build = canonical.build
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real_build(*a, **k)

    monkeypatch.setattr(canonical, "build", interrupted)
    dst = tmp_path / "out.safetensors"
    code, _, err = run_cli(["convert", small_pth[0], dst], capsys)
    assert code == 130 and "Traceback" not in err
    assert_nothing_at(dst)


# `rwkvcpu convert` in a child that pauses once its first tensor is in the
# .partial file, prints that file's name and sleeps: a signal sent then always
# lands mid-conversion, however fast the machine.
_PAUSING_CONVERT = """
import sys, time
from rwkvcpu.quant import writer
real_write = writer.SafetensorsWriter.write
def write(self, name, array):
    real_write(self, name, array)
    if not getattr(self, "paused", False):
        self.paused = True
        print(self._tmp, flush=True)
        time.sleep(600)
writer.SafetensorsWriter.write = write
from rwkvcpu.cli.main import main
main(sys.argv[1:])
"""


def test_sigterm_mid_conversion_leaves_nothing(tmp_path, small_pth):
    """A real `rwkvcpu convert` process, terminated while it writes, removes its partial file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "small.safetensors"
    p = subprocess.Popen([sys.executable, "-c", _PAUSING_CONVERT, "convert", str(small_pth[0]), str(dst),
                          "--dtype", "int8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        partial = p.stdout.readline().strip()      # blocks until the pause; "" if the child died
        assert partial and os.path.exists(partial), p.communicate(timeout=60)[1]
        assert Path(partial).parent == out_dir
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGTERM, (p.returncode, err)
    assert "Traceback" not in err and "wrote" not in err
    assert list(out_dir.iterdir()) == []


def test_signal_handlers_are_restored_and_never_taken_from_the_program(tmp_path, small_pth):
    from rwkvcpu.quant.convert import convert
    src = small_pth[0]
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    convert(src, tmp_path / "a.safetensors", dtype="int8", progress=False)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == before

    seen = []

    def own(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, own)
    try:
        def terminated_mid_way(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_build(*a, **k)

        import rwkvcpu.quant.canonical as canonical
        real_build = canonical.build
        canonical.build = terminated_mid_way
        try:
            convert(src, tmp_path / "b.safetensors", dtype="int8", progress=False)
        finally:
            canonical.build = real_build
        # the program's own handler ran (each time) and the conversion went on
        assert seen and signal.getsignal(signal.SIGTERM) is own
        assert (tmp_path / "b.safetensors").is_file()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_foreign_models_refused_by_name(tmp_path, capsys):
    from safetensors.numpy import save_file
    z = np.zeros((4, 4), np.float32)
    save_file({"model.layers.0.self_attn.q_proj.weight": z, "model.embed_tokens.weight": z},
              tmp_path / "llama.safetensors")
    code, _, err = run_cli(["convert", tmp_path / "llama.safetensors", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "llama.safetensors", "transformer", "self_attn")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    save_file({"x": z}, folder / "model.safetensors")
    code, _, err = run_cli(["info", folder], capsys)
    assert_one_line_error(code, err, "LlamaForCausalLM", "not RWKV")


def test_v7_deepembed_refused(tmp_path, capsys):
    sd = random_official_state_dict("v7", n_layer=2, n_embd=64, vocab_size=256, head_size=32)
    sd["blocks.0.ffn.s_emb.weight"] = np.zeros((256, 32), np.float32)
    sd["blocks.0.ffn.s1"] = np.zeros((64, 32), np.float32)
    write_pth(tmp_path / "de.pth", sd)
    code, _, err = run_cli(["convert", tmp_path / "de.pth", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "de.pth", "DeepEmbed", "s_emb")
    sd["blocks.1.qkv.qq.weight"] = np.zeros((256, 64), np.float32)
    sd["blocks.1.qkv.k1"] = np.zeros((64, 32), np.float32)
    write_pth(tmp_path / "dea.pth", sd)
    # info still describes it, and says why it cannot be converted.
    code, out, _ = run_cli(["info", tmp_path / "dea.pth"], capsys)
    line = [x for x in out.splitlines() if x.startswith("convertible:")][0]
    assert code == 0 and line.split(":", 1)[1].strip().startswith("no:") and "DEA attention" in line
    code, _, err = run_cli(["convert", tmp_path / "dea.pth", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "dea.pth", "DEA attention", "blocks.1.qkv.")
    sd2 = random_official_state_dict("v6", n_layer=2, n_embd=64, vocab_size=256, head_size=32)
    sd2["blocks.1.att.mystery"] = np.zeros((64,), np.float32)
    write_pth(tmp_path / "x.pth", sd2)
    code, _, err = run_cli(["convert", tmp_path / "x.pth", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "x.pth", "blocks.1.att.mystery")


def test_rwkvcpu_file_as_source(tmp_path, capsys, small_pth):
    dst = tmp_path / "m.safetensors"
    code, _, _ = run_cli(["convert", small_pth[0], dst, "-q"], capsys)
    assert code == 0 and dst.is_file()
    code, _, err = run_cli(["convert", dst, tmp_path / "again.safetensors"], capsys)
    assert_one_line_error(code, err, "m.safetensors", "already an rwkvcpu model")
    assert_nothing_at(tmp_path / "again.safetensors")


def test_bad_eos_token_id(tmp_path, capsys, small_pth):
    for eos, frag in (("abc", "--eos-token-id 'abc' is not a token id"), ("256", "outside the model's vocabulary")):
        dst = tmp_path / "o.safetensors"
        code, _, err = run_cli(["convert", small_pth[0], dst, "--eos-token-id", eos], capsys)
        assert_one_line_error(code, err, frag)
        assert_nothing_at(dst)


def test_bad_eps(tmp_path, capsys, small_pth):
    for eps, frag in (("abc", "not a number"), ("-1e-5", "must be positive")):
        dst = tmp_path / "o.safetensors"
        code, _, err = run_cli(["convert", small_pth[0], dst, "--eps", eps], capsys)
        assert_one_line_error(code, err, frag)
        assert_nothing_at(dst)


def test_destination_that_is_not_a_regular_file_is_kept(tmp_path, capsys, small_pth):
    """A named pipe, or a symbolic link to one or to a directory, is refused and left as it was."""
    import stat
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "to-pipe").symlink_to(fifo)
    (tmp_path / "dir").mkdir()
    (tmp_path / "to-dir").symlink_to(tmp_path / "dir")
    for name, frag in (("pipe", "is a named pipe (FIFO), not a regular file"),
                       ("to-pipe", "is a symbolic link to a named pipe (FIFO)"),
                       ("to-dir", "is a symbolic link to a directory")):
        code, _, err = run_cli(["convert", small_pth[0], tmp_path / name], capsys)
        assert_one_line_error(code, err, tmp_path / name, frag)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (tmp_path / "to-pipe").is_symlink()
    assert (tmp_path / "to-dir").is_symlink() and list((tmp_path / "dir").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_symbolic_link_to_a_regular_file_is_replaced_and_its_target_kept(tmp_path, capsys, small_pth):
    target = tmp_path / "old.safetensors"
    target.write_bytes(b"previous contents")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    code, _, err = run_cli(["convert", small_pth[0], link, "-q"], capsys)
    assert code == 0, err
    assert not link.is_symlink() and link.stat().st_size > 1000
    assert target.read_bytes() == b"previous contents"


def test_destination_among_the_files_read(tmp_path, capsys):
    """DST may be none of the inputs: a folder's weight, index or config file, the state, the tokenizer."""
    from safetensors.numpy import save_file

    full = random_official_state_dict("v6", n_layer=2, n_embd=64, vocab_size=256, head_size=32, time_state=True)
    states = {k: v for k, v in full.items() if k.endswith("att.time_state")}
    model = {k: v for k, v in full.items() if k not in states}
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Rwkv6ForCausalLM"]}')
    save_file(model, folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(model)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for f, ks in shards.items():
        save_file({k: model[k] for k in ks}, sharded / f)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    pth = write_pth(tmp_path / "m.pth", model)
    write_pth(tmp_path / "st.pth", states)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(byte_tokenizer_json())
    (tmp_path / "hard-link.pth").hardlink_to(tmp_path / "st.pth")
    cases = (
        ([folder, folder / "model.safetensors"], "is a weight file of the source folder"),
        ([folder, folder / "config.json"], "is the config.json of the source folder"),
        ([sharded, sharded / "b.safetensors"], "is a weight file of the source folder"),
        ([sharded, sharded / "model.safetensors.index.json"], "is the shard index of the source folder"),
        ([pth, tmp_path / "st.pth", "--state", tmp_path / "st.pth"], "is the state-tuning file (--state)"),
        ([pth, tmp_path / "hard-link.pth", "--state", tmp_path / "st.pth"], "is the state-tuning file (--state)"),
        ([pth, tok, "--tokenizer", tok], "is the tokenizer.json given with --tokenizer"),
    )
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, frag in cases:
        code, _, err = run_cli(["convert", *args], capsys)
        assert_one_line_error(code, err, args[1], frag, "which this conversion reads")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # the same inputs convert to another file
    code, _, err = run_cli(["convert", folder, tmp_path / "ok.safetensors", "-q"], capsys)
    assert code == 0, err



def test_tokenizer_that_does_not_fit_the_vocabulary(tmp_path, capsys, small_pth):
    """Refused at conversion, by the rule generate applies, naming the source; nothing written."""
    dst = tmp_path / "o.safetensors"
    code, _, err = run_cli(["convert", small_pth[0], dst, "--tokenizer", "world"], capsys)
    assert_one_line_error(code, err, f"{small_pth[0]}: the world tokenizer has 65536 tokens but the model only "
                                     f"256 logits; pass --tokenizer bytes (the default for this vocabulary)")
    assert_nothing_at(dst)


def test_vocabulary_without_a_built_in_tokenizer(tmp_path, capsys):
    sd = random_official_state_dict("v7", n_layer=2, n_embd=64, vocab_size=300, head_size=32)
    src = write_pth(tmp_path / "rv7.pth", sd)
    dst = tmp_path / "x.safetensors"
    code, _, err = run_cli(["convert", src, dst], capsys)
    assert_one_line_error(code, err, f"{src}: a vocabulary of 300 tokens matches no built-in tokenizer; "
                                     f"pass --tokenizer world|neox-20b|bytes or the path of a tokenizer.json "
                                     f"(of at most 300 tokens)")
    assert_nothing_at(dst)
    # a smaller tokenizer fits a padded vocabulary
    code, _, err = run_cli(["convert", src, dst, "--tokenizer", "bytes", "-q"], capsys)
    assert code == 0 and dst.is_file(), err


def test_safetensors_cut_inside_its_header(tmp_path, capsys, small_pth):
    """Said to be truncated (by one rule, for the converter's reader and the engine), not unrecognised."""
    from safetensors.numpy import save_file

    from rwkvcpu.errors import ModelFormatError
    from rwkvcpu.io import open_safetensors
    model = tmp_path / "model.safetensors"
    code, _, err = run_cli(["convert", small_pth[0], model, "-q"], capsys)
    assert code == 0, err
    save_file(dict(small_pth[1]), tmp_path / "plain.safetensors")
    for name in ("model.safetensors", "plain.safetensors"):
        data = (tmp_path / name).read_bytes()
        n = int.from_bytes(data[:8], "little")
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[:8 + n // 2])
        want = f"{cut}: truncated: the safetensors header says {8 + n} bytes of header but the file has {8 + n // 2}"
        code, _, err = run_cli(["info", cut], capsys)
        assert_one_line_error(code, err, want)
        dst = tmp_path / "o.safetensors"
        code, _, err = run_cli(["convert", cut, dst], capsys)
        assert_one_line_error(code, err, want)
        assert_nothing_at(dst)
        with pytest.raises(ModelFormatError, match="^" + re.escape(want) + "$"):
            open_safetensors(cut)
    # an implausible header length is still no safetensors file at all
    (tmp_path / "huge.bin").write_bytes((200 << 20).to_bytes(8, "little") + b"{" + bytes(100))
    code, _, err = run_cli(["info", tmp_path / "huge.bin"], capsys)
    assert_one_line_error(code, err, "huge.bin", "unrecognised file")


def test_folder_of_several_models(tmp_path, capsys):
    """Unrelated *.safetensors without an index are not merged as shards; one file is asked for."""
    from safetensors.numpy import save_file

    folder = tmp_path / "models"
    folder.mkdir()
    for name, gen in (("a.safetensors", "v6"), ("b.safetensors", "v7")):
        save_file(random_official_state_dict(gen, n_layer=2, n_embd=64, vocab_size=256, head_size=32),
                  folder / name)
    want = (f"{folder}: holds several *.safetensors files without an index (model.safetensors.index.json) "
            f"that are not shards of one model (a.safetensors and b.safetensors both hold ")
    dst = tmp_path / "o.safetensors"
    code, _, err = run_cli(["convert", folder, dst], capsys)
    assert_one_line_error(code, err, want, "give one of them as the source")
    assert "appears in two shards" not in err
    assert_nothing_at(dst)
    code, _, err = run_cli(["info", folder], capsys)
    assert_one_line_error(code, err, want)
    code, _, err = run_cli(["convert", folder / "b.safetensors", dst, "-q"], capsys)
    assert code == 0, err
