"""Perplexity and bits per byte: exact on a fake model, chunk-invariant on a real one, CLI without torch."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SHARED
from generate_fakes import FakeModel, tiny_v7_file  # noqa: F401 (fixture)
from rwkvcpu.cli.main import cli
from rwkvcpu.errors import InvalidArgumentError
from rwkvcpu.perplexity import perplexity, target_log_probs

RWKVCPU = str(Path(sys.executable).parent / "rwkvcpu")


def manual_nll(model, tokens):
    """Token by token, the plain way: -sum log softmax(logits before t)[t]."""
    logits, state = model.forward(tokens[:1])
    total = 0.0
    for t in tokens[1:]:
        x = logits.astype(np.float64)
        total -= x[t] - x.max() - math.log(np.exp(x - x.max()).sum())
        logits, state = model.forward([t], state)
    return total


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_exact_on_a_fake_model(chunk):
    m = FakeModel("Once upon a time.\n\n", peak=3.0)
    text = "Once upon a time.\n\nOnce upon a dime."
    r = perplexity(m, text, chunk_size=chunk)
    tokens = list(text.encode())
    assert r.tokens == len(tokens) - 1        # bytes tokenizer has no end-of-text: first token unscored
    assert r.bytes == len(tokens) - 1
    assert r.nll == pytest.approx(manual_nll(m, tokens), rel=1e-6)  # exp runs in float32
    assert r.perplexity == pytest.approx(math.exp(r.nll / r.tokens))
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / r.bytes)


def test_end_of_text_token_is_fed_first_when_there_is_one():
    from rwkvcpu.tokenizers import load_tokenizer
    m = FakeModel("abc", peak=3.0)
    m.tokenizer = load_tokenizer(dict(m.metadata, eos_token_id="0"))
    r = perplexity(m, "abcab")
    assert r.tokens == 5 and r.bytes == 5
    assert r.nll == pytest.approx(manual_nll(m, [0] + list(b"abcab")), rel=1e-6)  # exp runs in float32


def test_max_tokens_and_bad_arguments():
    m = FakeModel()
    assert perplexity(m, "Once upon a time", max_tokens=4).tokens == 4
    with pytest.raises(InvalidArgumentError, match="too short"):
        perplexity(m, "O")
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        perplexity(m, "Once", chunk_size=0)


def test_target_log_probs_is_a_log_softmax():
    logits = np.random.default_rng(0).normal(size=(5, 9)).astype(np.float32)
    targets = np.array([0, 3, 8, 1, 1])
    x = logits.astype(np.float64)
    ref = x[np.arange(5), targets] - np.log(np.exp(x).sum(1))
    np.testing.assert_allclose(target_log_probs(logits, targets), ref, atol=1e-6)


def test_real_model_chunks_do_not_change_the_result(tiny_v7_file):
    import rwkvcpu
    m = rwkvcpu.load(tiny_v7_file)
    text = "In the beginning the little dog ran to the house, and the cat sat by the fire."
    a = perplexity(m, text, chunk_size=7)
    b = perplexity(m, text, chunk_size=1000)
    tokens = list(text.encode())                   # byte-level: no end-of-text token is fed first
    assert m.tokenizer.encode(text) == tokens and m.tokenizer.eos_token_id is None
    assert a.tokens == b.tokens == a.bytes == len(tokens) - 1
    assert a.nll == pytest.approx(b.nll, rel=1e-4)
    # The same score by hand: every position's logits from one forward call, and
    # a float64 log-softmax taken here.
    logits, _ = m.forward(tokens[:-1], all_logits=True)
    x = np.asarray(logits, np.float64)
    log_probs = x - x.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]].sum()
    assert a.nll == pytest.approx(nll, rel=1e-4)
    assert a.bits_per_byte == pytest.approx(nll / math.log(2) / (len(tokens) - 1), rel=1e-4)
    if SHARED is not None:
        # the trained tiny model beats a uniform guess over 256 bytes (8 bits per byte),
        # which a random-weight model (without ../shared) does not
        assert a.bits_per_byte < 8.0


def test_cli_runner(tiny_v7_file, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning the little dog ran to the house.", encoding="utf-8")
    result = CliRunner().invoke(cli, ["perplexity", str(tiny_v7_file), str(text), "--chunk-size", "16"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    assert int(lines["tokens"]) == 48
    assert float(lines["perplexity"]) > 1 and float(lines["bits per byte"]) > 0


def test_cli_errors(tiny_v7_file, tmp_path, capsys):
    from rwkvcpu.cli.main import main
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9")
    for args, message in [([str(tiny_v7_file), str(tmp_path / "none.txt")], "no such text file"),
                          ([str(tiny_v7_file), str(latin1)], "not UTF-8"),
                          ([str(tmp_path / "none.safetensors"), str(latin1)], "not UTF-8"),
                          ([str(tiny_v7_file), str(latin1), "--chunk-size", "0"], "--chunk-size")]:
        with pytest.raises(SystemExit) as e:
            main(["perplexity", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_subprocess_needs_no_torch(tiny_v7_file, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning the little dog ran to the house.", encoding="utf-8")
    # torch made unimportable: any import of it would fail the command
    code = ("import sys; sys.modules['torch'] = None; from rwkvcpu.cli.main import main; "
            f"main(['perplexity', {str(tiny_v7_file)!r}, {str(text)!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert p.returncode == 0, p.stderr
    assert "bits per byte:" in p.stdout and "perplexity:" in p.stdout
    # and the real command
    p = subprocess.run([RWKVCPU, "perplexity", str(tiny_v7_file), str(text)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "perplexity:" in p.stdout
