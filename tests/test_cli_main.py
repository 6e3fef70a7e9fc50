"""The `rwkvcpu` entry point: a wrong flag or command is one line on stderr and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from rwkvcpu.cli.main import main

RWKVCPU = str(Path(sys.executable).parent / "rwkvcpu")


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--no-such-flag"], "No such option"),
    (["convert"], "Missing argument 'SRC'"),
    (["no-such-command"], "No such command"),
    (["convert", "a.pth", "b.safetensors", "--dtype", "int3"], "int3"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_help_lists_every_command_and_exits_0():
    p = subprocess.run([RWKVCPU, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in ("generate", "chat", "convert", "info", "perplexity", "bench"):
        assert f"  {name}" in p.stdout


def test_bare_command_prints_the_help_to_stdout_and_exits_0():
    bare = subprocess.run([RWKVCPU], capture_output=True, text=True, timeout=120)
    helped = subprocess.run([RWKVCPU, "--help"], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0 and bare.stderr == "", bare.stderr
    assert bare.stdout == helped.stdout and bare.stdout.startswith("Usage: rwkvcpu")


def test_wrong_flag_as_a_real_process():
    p = subprocess.run([RWKVCPU, "info", "--bogus"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
