"""`rwkvcpu generate` end to end: through click's runner, through main(), and as a real subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from generate_fakes import tiny_v7_file  # noqa: F401 (fixture)
from rwkvcpu.cli.main import cli, main
from rwkvcpu.errors import InvalidArgumentError, ModelFormatError

RWKVCPU = str(Path(sys.executable).parent / "rwkvcpu")
GREEDY = ["-t", "0", "--presence-penalty", "0", "--frequency-penalty", "0"]


@pytest.fixture(scope="module")
def tiny(tiny_v7_file):
    import rwkvcpu
    return rwkvcpu.load(tiny_v7_file)


def expected(model, prompt, n):
    return model.complete(prompt, max_tokens=n, temperature=0, presence_penalty=0, frequency_penalty=0)


def test_runner_streams_the_same_text_as_the_api(tiny_v7_file, tiny):
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_v7_file), "-n", "8", *GREEDY, "In the"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected(tiny, "In the", 8)


def test_runner_prompt_from_stdin_drops_one_newline(tiny_v7_file, tiny):
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_v7_file), "-n", "5", *GREEDY],
                                input="In the\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected(tiny, "In the", 5)


def test_runner_echo_stats_and_stop(tiny_v7_file, tiny):
    full = expected(tiny, "In the", 12)
    stop = full[4:7]
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_v7_file), "-n", "12", *GREEDY, "--echo",
                                      "--stats", "--stop", stop, "In the"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "In the" + full[:full.index(stop)]
    assert "tokens/s" in result.stderr and "prompt: 6 tokens" in result.stderr


def test_runner_seed_reproduces(tiny_v7_file):
    args = ["generate", "-m", str(tiny_v7_file), "-n", "10", "--seed", "3", "In the"]
    a, b = CliRunner().invoke(cli, args), CliRunner().invoke(cli, args)
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_runner_escapes_in_stop_strings(tiny_v7_file):
    from rwkvcpu.cli.options import unescape
    assert unescape("\\n\\nUser:") == "\n\nUser:"
    assert unescape("plain") == "plain"


def test_help_lists_every_option():
    result = CliRunner().invoke(cli, ["generate", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p",
                 "--presence-penalty", "--frequency-penalty", "--penalty-decay", "--repetition-penalty",
                 "--logit-bias", "--ban", "--stop", "--stop-token", "--ignore-eos", "--seed", "--stats"):
        assert flag in result.output


@pytest.mark.parametrize("args, error", [
    (["-t", "-1", "x"], "--temperature must be >= 0 (0 means greedy), got -1"),
    (["--top-p", "0", "x"], "--top-p must be > 0 (--top-p is in (0, 1]; 1 turns it off), got 0"),
    (["--top-p", "1.5", "x"], "--top-p must be <= 1 (--top-p is in (0, 1]; 1 turns it off), got 1.5"),
    (["--top-k", "-2", "x"], "--top-k must be >= 0 (0 turns it off), got -2"),
    (["--min-p", "2", "x"], "--min-p must be <= 1 (--min-p is in [0, 1]; 0 turns it off), got 2"),
    (["--penalty-decay", "-1", "x"], "--penalty-decay must be >= 0 (--penalty-decay is in [0, 1]), got -1"),
    (["--repetition-penalty", "0", "x"], "--repetition-penalty must be > 0 (1 turns it off), got 0"),
    (["-n", "-1", "x"], "--max-tokens must be an integer >= 0 (0 means no limit), got '-1'"),
    (["--seed", "-1", "x"], "--seed must be >= 0, got -1"),
    (["--ban", "-3", "x"], "--ban token id must be >= 0, got -3"),
    (["--stop-token", "-1", "x"], "--stop-token id must be >= 0, got -1"),
    (["--logit-bias", "-2=1", "x"], "--logit-bias token id must be >= 0, got -2"),
    (["--logit-bias", "5=inf", "x"], "--logit-bias 5=BIAS must be a finite number, got inf"),
    (["--stop", "", "x"], "--stop values must be non-empty strings, got ''"),
    (["--seed", "abc", "x"], "--seed must be an integer, got 'abc'"),
    (["--temperature", "warm", "x"], "--temperature must be a number"),
    (["--logit-bias", "5", "x"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["-m", "/nonexistent/model.safetensors", "x"], "no such model file"),
    (["-m", "/nonexistent/model.safetensors", ""], "prompt is empty"),
    (["--threads", "0", "x"], "--threads must be a positive integer, got '0'"),
    (["--threads", "-3", "x"], "--threads must be a positive integer, got '-3'"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, error, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err and err.startswith("error: ")


@pytest.mark.parametrize("args, error", [
    (["--ban", "99999"], "--ban token id 99999 is outside the model's vocabulary (0 .. {top})"),
    (["--stop-token", "99999"], "--stop-token id 99999 is outside the model's vocabulary (0 .. {top})"),
    (["--logit-bias", "99999=1"], "--logit-bias token id 99999 is outside the model's vocabulary (0 .. {top})"),
])
def test_token_ids_outside_the_vocabulary_are_named_by_their_flag(tiny_v7_file, tiny, args, error, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", str(tiny_v7_file), *args, "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {error.format(top=tiny.config.vocab_size - 1)}\n"


def test_the_api_keeps_naming_its_keyword_arguments():
    from rwkvcpu.sampling import make_params
    with pytest.raises(InvalidArgumentError, match=r"^max_tokens must be >= 0 \(None means no limit\), got -1$"):
        make_params(max_tokens=-1)
    with pytest.raises(InvalidArgumentError, match=r"^top_p must be > 0 \(top_p is in \(0, 1\]; 1 turns it off\), got 0$"):
        make_params(top_p=0)


def test_bad_input_through_the_runner_is_our_error_type():
    result = CliRunner().invoke(cli, ["generate", "-t", "-1", "x"])
    assert isinstance(result.exception, InvalidArgumentError)


def test_missing_shipped_model_is_a_clear_error(monkeypatch, tmp_path):
    import rwkvcpu.models
    monkeypatch.setattr(rwkvcpu.models, "default_model_path", lambda: tmp_path / "absent.safetensors")
    result = CliRunner().invoke(cli, ["generate", "Once upon a time"])
    assert isinstance(result.exception, ModelFormatError)
    assert "pass a model file with --model" in str(result.exception)


def test_unreadable_model(tmp_path, capsys):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", str(bad), "hello"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------- real processes

def run(*args, stdin=None):
    return subprocess.run([RWKVCPU, *args], input=stdin, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))


def test_subprocess_generates_and_reads_stdin(tiny_v7_file, tiny):
    p = run("generate", "-m", str(tiny_v7_file), "-n", "8", *GREEDY, "--stats", stdin="In the")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected(tiny, "In the", 8)
    assert "tokens/s" in p.stderr


@pytest.mark.parametrize("args", [
    ["generate", "-m", "/nonexistent.safetensors", "hi"],
    ["generate", "-t", "-0.5", "hi"],
    ["generate", "--top-p", "2", "hi"],
    ["generate", "--top-k", "-1", "hi"],
    ["generate", "--seed", "twelve", "hi"],
    ["generate", "--threads", "0", "hi"],
    ["generate", b"caf\xe9 au lait"],        # not UTF-8, and the shipped model's tokenizer needs it
])
def test_subprocess_bad_input(args):
    p = run(*args)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    assert "Traceback" not in p.stderr


def test_subprocess_empty_prompt_on_stdin(tiny_v7_file):
    p = run("generate", "-m", str(tiny_v7_file), stdin="")
    assert p.returncode == 2 and "prompt is empty" in p.stderr and p.stderr.count("\n") == 1


def test_subprocess_uses_the_shipped_model_by_default():
    import rwkvcpu
    from rwkvcpu.models import default_model_path
    p = run("generate", "-n", "12", *GREEDY, "Once upon a time")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected(rwkvcpu.load(default_model_path()), "Once upon a time", 12)
    assert p.stdout.strip()


def test_subprocess_prompt_bytes_that_are_not_utf8_reach_a_byte_model(tiny_v7_file, tiny):
    """A byte-level (or World) vocabulary encodes any bytes: they are fed as they came."""
    p = run("generate", "-m", str(tiny_v7_file), "-n", "8", *GREEDY, b"caf\xe9 ")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected(tiny, [99, 97, 102, 0xE9, 32], 8)


@pytest.mark.parametrize("command", ["generate", "chat", "perplexity"])
def test_help_does_not_load_the_engine(command):
    code = ("import sys; from click.testing import CliRunner; from rwkvcpu.cli.main import cli; "
            f"r = CliRunner().invoke(cli, [{command!r}, '--help']); "
            "print(r.exit_code, 'numba' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "False", "False"], out.stderr


def test_subprocess_stdin_bytes_that_are_not_utf8(tiny_v7_file, tiny):
    """A strict UTF-8 stdin (PYTHONIOENCODING=utf-8, or a UTF-8 locale) must not end in a traceback:
    the bytes reach the tokenizer, which encodes them (here a byte vocabulary) or refuses them in one line."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    p = subprocess.run([RWKVCPU, "generate", "-m", str(tiny_v7_file), "-n", "8", *GREEDY], input=b"caf\xe9 \n",
                       capture_output=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode("utf-8") == expected(tiny, [99, 97, 102, 0xE9, 32], 8)
    p = subprocess.run([RWKVCPU, "generate", "-n", "8"], input=b"caf\xe9 \n", capture_output=True,
                       timeout=300, env=env)
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.decode() == ("error: the text is not valid UTF-8 (byte 0xe9 at offset 3) and this model's "
                                 "tokenizer reads only UTF-8: convert it first (e.g. iconv -f latin1 -t utf-8)\n")
