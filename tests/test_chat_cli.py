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


@pytest.mark.parametrize("stdin_env", [{}, {"PYTHONIOENCODING": "utf-8"}], ids=["locale", "strict-utf-8"])
def test_subprocess_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tmp_path, stdin_env):
    """The shipped model's (Hugging Face) tokenizer reads only UTF-8: a Latin-1 line is refused
    in one line on stderr, and the chat goes on as if it had never been typed. With
    PYTHONIOENCODING=utf-8 (as under a UTF-8 locale) Python decodes stdin strictly."""
    import numpy as np
    import rwkvcpu
    from rwkvcpu.generate import ChatSession
    from rwkvcpu.models import default_model_path
    from rwkvcpu.state import State
    path = tmp_path / "s.state"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    p = subprocess.run([RWKVCPU, "chat", "-n", "5", *GREEDY],
                       input=b"Hello\n\xe9t\xe9\nBye\n/save " + bytes(path) + b"\n",
                       capture_output=True, timeout=300, env=dict(env, **stdin_env))
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in err.splitlines() if "(conversation saved to" not in line]
    assert len(errors) == 1 and "not valid UTF-8 (byte 0xe9 at offset 0)" in errors[0], err
    # The same conversation through the API, without the refused line.
    model = rwkvcpu.load(default_model_path())
    chat = ChatSession(model, max_tokens=5, temperature=0, presence_penalty=0, frequency_penalty=0)
    replies = ["".join(chat.send(message)) for message in ("Hello", "Bye")]
    assert p.stdout.decode("utf-8") == (f"User: Hello\n\nAssistant: {replies[0]}\n\n"
                                        f"User: Bye\n\nAssistant: {replies[1]}\n\n")
    # and the same state, to the bit: nothing of the refused line was fed
    np.testing.assert_array_equal(State.load(path, model).data, chat.state.data)


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "error: --threads must be a positive integer, got '0'"),
    (["--top-p", "0"], "error: --top-p must be > 0 (--top-p is in (0, 1]; 1 turns it off), got 0\n"),
    (["-n", "-1"], "error: --max-tokens must be an integer >= 0 (0 means no limit), got '-1'\n"),
    (["--load", "/nonexistent/c.state"], "error: /nonexistent/c.state: no such state file"),
])
def test_subprocess_bad_options_are_one_line(args, message):
    p = subprocess.run([RWKVCPU, "chat", *args], input="Hello\n", capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(message), p.stderr


def test_subprocess_save_and_load_failures_are_one_line_and_the_chat_goes_on(tiny_v7_file, tmp_path):
    missing = tmp_path / "nodir" / "x.state"
    p = subprocess.run([RWKVCPU, "chat", "-m", str(tiny_v7_file), "-n", "3", *GREEDY],
                       input=f"Hello\n/save {missing}\n/save {tmp_path}\n/load {tmp_path}\nAgain\n",
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [
        f"error: {missing}: cannot save the state: no such directory {tmp_path / 'nodir'}",
        f"error: {tmp_path}: cannot save the state: is a directory",
        f"error: {tmp_path}: is a directory, not a state file",
    ]
    assert "User: Again\n\nAssistant:" in p.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temporary file left behind"
