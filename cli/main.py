"""The `rwkvcpu` command: a table of contents of the subcommands.

Each subcommand lives in its own module and only parses arguments and calls
the library. Modules are imported when their command runs, so `rwkvcpu info`
does not pay for compiling kernels it never calls.
"""

import importlib
import sys
import warnings

import click

from rwkvcpu.errors import RwkvCpuError, one_line

# command name -> (module, attribute)
COMMANDS = {
    "generate": ("rwkvcpu.cli.generate", "generate"),
    "chat": ("rwkvcpu.cli.chat", "chat"),
    "convert": ("rwkvcpu.cli.convert", "convert"),
    "info": ("rwkvcpu.cli.convert", "info"),
    "perplexity": ("rwkvcpu.cli.perplexity", "perplexity"),
    "bench": ("rwkvcpu.cli.bench", "bench"),
    "serve": ("rwkvcpu.cli.serve", "serve"),
}

# Bare `rwkvcpu`: click >= 8.2 raises this usage error where 8.1 printed the help and exited 0.
# (An empty tuple where it does not exist: an except clause that catches nothing.)
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rwkvcpu")
def cli():
    """rwkvcpu: run RWKV language models (v4, v5, v6, v7) on the CPU.

    \b
    Start with:
      rwkvcpu generate "Once upon a time"
      rwkvcpu convert model.pth model-int8.safetensors --dtype int8
      rwkvcpu info model-int8.safetensors
      rwkvcpu serve model-int8.safetensors      (pip install 'rwkvcpu[server]')
    """


def fail(message: str, code: int = 2):
    """Print `error: message` as one line on stderr (names read from a file cannot break it) and exit."""
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def main(argv=None):
    """Entry point: library errors become one line on stderr and exit code 2."""
    # The library says in words when values overflow (rwkvcpu.checks); numpy's own
    # "overflow encountered in ..." lines would only add noise to a user's terminal.
    warnings.filterwarnings("ignore", message=r".* encountered in ", category=RuntimeWarning)
    try:
        rc = cli.main(args=argv, prog_name="rwkvcpu", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except NO_ARGS_IS_HELP as e:
        # No command: the help, as `rwkvcpu --help` prints it; nothing went wrong.
        click.echo(e.ctx.get_help())
        sys.exit(0)
    except click.UsageError as e:
        # One line, as for every other bad input: what is wrong and where to look.
        where = e.ctx.command_path if e.ctx is not None else "rwkvcpu"
        fail(f"{e.format_message()} (see '{where} --help')")
    except click.ClickException as e:
        fail(e.format_message())
    except RwkvCpuError as e:
        fail(str(e))
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # `rwkvcpu generate ... | head` closed our stdout: not an error.
        sys.exit(0)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
