"""`rwkvcpu chat`: an interactive conversation in the RWKV World chat format."""

from __future__ import annotations

import sys

import click

from rwkvcpu.errors import RwkvCpuError
from rwkvcpu.generate import CHAT_DEFAULTS

from .options import (lenient_stdin, load_model, model_option, pop_sampling, sampling_options, text_stdout,
                      threads_option)

HELP = """\
Commands:
  /reset        forget the conversation and start again
  /save FILE    save the conversation (the model's state) to FILE
  /load FILE    continue a conversation saved with /save
  /help         show this help
  /quit         leave (Ctrl-D does too)
Ctrl-C stops the reply being written. Start a message with // to send a line beginning with /."""


def run_command(session, line: str) -> bool:
    """Carry out a /command; return False when the chat should end."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    say = lambda text: click.echo(text, err=True)  # noqa: E731
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        say(HELP)
    elif name == "/reset":
        session.reset()
        say("(conversation reset)")
    elif name in ("/save", "/load"):
        if not arg:
            say(f"error: {name} needs a file name, like {name} chat.state")
            return True
        try:
            if name == "/save":
                session.save(arg)
                say(f"(conversation saved to {arg})")
            else:
                session.load(arg)
                say(f"(conversation loaded from {arg})")
        except (RwkvCpuError, OSError) as e:
            say(f"error: {e}")
    else:
        say(f"error: unknown command {name}; /help lists the commands")
    return True


def read_message(interactive: bool, user: str):
    """The next line typed or piped in, without its newline; None at the end of input."""
    if interactive:
        try:
            return input(f"{user}: ")
        except EOFError:
            click.echo("", err=True)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@sampling_options(CHAT_DEFAULTS)
@threads_option
@click.option("--system", metavar="TEXT", help="Instructions fed once at the start, as 'System: TEXT'.")
@click.option("--load", "state_path", metavar="FILE", help="Continue a conversation saved with /save.")
def chat(model_path, threads, system, state_path, **options):
    """Chat with the model in the RWKV World format (User: ... / Assistant: ...).

    The conversation lives in the model's state: earlier turns are never fed
    again, so every turn costs the same. Type /help for the commands
    (/reset, /save FILE, /load FILE, /quit). Ctrl-C stops the current reply;
    Ctrl-D or /quit leaves.

    With stdin from a pipe or file, each line is one message (or command) and
    the whole conversation is printed:

    \b
      printf 'Hi!\\nTell me a joke.\\n' | rwkvcpu chat --seed 1
    """
    from rwkvcpu.generate import ChatSession

    sampling = pop_sampling(options, CHAT_DEFAULTS)          # bad values fail before the model loads
    model = load_model(model_path, threads)
    session = ChatSession(model, system=system, params=sampling.for_model(model))
    if state_path:
        session.load(state_path)

    interactive = sys.stdin is not None and sys.stdin.isatty()
    lenient_stdin()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        click.echo("Chatting. /help for commands, Ctrl-C stops a reply, Ctrl-D quits.", err=True)
    out = text_stdout()
    while True:
        try:
            line = read_message(interactive, session.user)
        except KeyboardInterrupt:
            if not interactive:
                raise
            click.echo("\n(Ctrl-D or /quit leaves)", err=True)
            continue
        if line is None:
            break
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not run_command(session, line):
                break
            continue
        if line.startswith("//"):
            line = line[1:]
        try:
            reply = session.send(line)
        except RwkvCpuError as e:
            # One line, and the conversation goes on as if the line had not been typed.
            click.echo(f"error: message not sent: {e}", err=True)
            continue
        except KeyboardInterrupt:
            # Ctrl-C while the last reply was folded into the state: the session
            # closes that turn again with the next message.
            click.echo("(stopped; message not sent)", err=True)
            continue
        if not interactive:
            out.write(f"{session.user}: {line.strip()}\n\n")
        out.write(f"{session.assistant}: ")
        out.flush()
        try:
            for chunk in reply:
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            # Ctrl-C ends this reply only; the session closes the turn on the next message
            out.write(" [stopped]")
        out.write("\n\n")
        out.flush()
