"""`rwkvcpu chat`: piped input, commands, Ctrl-C; through click's runner and as a real subprocess."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from generate_fakes import FakeModel, tiny_v7_file  # noqa: F401 (fixture)
from rwkvcpu.cli.main import cli

RWKVCPU = str(Path(sys.executable).parent / "rwkvcpu")
GREEDY = ["-t", "0", "--presence-penalty", "0", "--frequency-penalty", "0"]


@pytest.fixture
def fake(monkeypatch):
    """Run the chat command on a FakeModel whose replies are ' Hi there.'"""
    import rwkvcpu.cli.chat as chat_cli
    model = FakeModel(" Hi there.\n\n")
    monkeypatch.setattr(chat_cli, "load_model", lambda path, threads=None: model)
    return model


def chat(*lines, args=()):
    return CliRunner().invoke(cli, ["chat", *GREEDY, *args], input="".join(l + "\n" for l in lines))


def test_piped_conversation_prints_a_world_format_transcript(fake):
    result = chat("Hello!", "", "How are you?")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("User: Hello!\n\nAssistant: Hi there.\n\n"
                             "User: How are you?\n\nAssistant: Hi there.\n\n")
    assert fake.tokenizer.decode(fake.fed).count("User:") == 2


def test_commands(fake, tmp_path):
    path = tmp_path / "c.state"
    result = chat("one", f"/save {path}", "/reset", "two", f"/load {path}", "/help", "/nope", "/save",
                  "//slash", "/quit", "never sent")
    assert result.exit_code == 0, result.output
    assert path.exists()
    assert "(conversation saved to" in result.stderr and "(conversation reset)" in result.stderr
    assert "(conversation loaded from" in result.stderr
    assert "/reset" in result.stderr and "/load FILE" in result.stderr          # the help
    assert "unknown command /nope" in result.stderr
    assert "/save needs a file name" in result.stderr
    assert "User: /slash" in result.stdout
    assert "never sent" not in result.stdout


def test_load_of_a_foreign_state_is_reported_and_the_chat_goes_on(fake, tmp_path):
    bad = tmp_path / "bad.state"
    bad.write_text("nope")
    result = chat(f"/load {bad}", "hi")
    assert result.exit_code == 0
    assert "error:" in result.stderr and "Assistant: Hi there." in result.stdout


def test_ctrl_c_stops_the_reply_not_the_program(fake, monkeypatch):
    forward = fake.forward
    calls = {"n": 0}

    def interrupted(tokens, state=None, **kw):
        calls["n"] += 1
        if calls["n"] == 4:               # in the middle of the first reply
            raise KeyboardInterrupt
        return forward(tokens, state, **kw)

    monkeypatch.setattr(fake, "forward", interrupted)
    result = chat("first", "second")
    assert result.exit_code == 0, result.output
    first, second = result.stdout.split("User: second")
    assert first.endswith(" [stopped]\n\n")
    assert second.endswith("Assistant: Hi there.\n\n")
    # the stopped turn was closed with a blank line before the next one
    assert "\n\nUser: second\n\nAssistant:" in fake.tokenizer.decode(fake.fed)


def test_chat_help():
    result = CliRunner().invoke(cli, ["chat", "--help"])
    assert result.exit_code == 0
    for word in ("/reset", "/save FILE", "/load FILE", "Ctrl-C", "--system", "--top-p", "--seed"):
        assert word in result.output


def test_chat_bad_option_is_one_line(capsys):
    from rwkvcpu.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["chat", "--top-p", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------- real processes

def test_subprocess_piped_chat_with_state_file(tiny_v7_file, tmp_path):
    path = tmp_path / "s.state"
    p = subprocess.run([RWKVCPU, "chat", "-m", str(tiny_v7_file), "-n", "5", *GREEDY],
                       input=f"Hello\n/save {path}\n/reset\n/load {path}\nAgain\n", capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("User: Hello\n\nAssistant:")
    assert "User: Again\n\nAssistant:" in p.stdout
    assert path.exists() and "Traceback" not in p.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_subprocess_sigint_stops_only_the_reply(tiny_v7_file):
    # A reply that cannot end by itself before the signal: no newline token (so no blank
    # line), no end-of-text, and far more tokens than can run in the half second we wait.
    p = subprocess.Popen([RWKVCPU, "chat", "-m", str(tiny_v7_file), "-n", "1000000", *GREEDY,
                          "--ignore-eos", "--ban", "10"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1"))
    p.stdin.write(b"Hello\n")
    p.stdin.flush()
    seen = b""
    deadline = time.time() + 120
    while b"Assistant: " not in seen and time.time() < deadline:
        got = os.read(p.stdout.fileno(), 100)
        if not got:
            break   # the child closed its output (it died): the assertions below say why
        seen += got
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(b"/quit\n", timeout=120)
    out = (seen + out).decode("utf-8", "replace")
    assert p.returncode == 0, err.decode()
    assert "[stopped]" in out
