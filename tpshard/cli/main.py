"""The entry point: every command registered, and every failure turned into one line and an exit code."""

import gc
import os
import sys
from typing import NoReturn

import typer

from tpshard.cli import convert, describe, generate, verify  # noqa: F401  (registers the commands)
from tpshard.cli.app import app
from tpshard.errors import TpshardError

try:  # recent typer carries its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_exceptions


def main() -> None:
    # c10d logs its own errors (a lost peer, a store that does not answer) as extra lines on stderr;
    # tpshard reports each failure as one line. Read when torch loads, which commands do lazily.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    command = typer.main.get_command(app)
    try:
        # not standalone: click's usage errors come here (its own rendering is a 5-line box), and
        # typer.Exit / ctx.exit(code) (--help, --version, verify's failed check) come back as a code
        code = command.main(args=sys.argv[1:], prog_name="tpshard", standalone_mode=False)
    except TpshardError as e:
        _fail(str(e))
    except click_exceptions.UsageError as e:
        _fail(f"{_sentence(e.format_message())}; see '{_command_path(e.ctx, command.commands)} --help'")
    except click_exceptions.ClickException as e:  # e.g. a click.File that cannot be opened
        _fail(_sentence(e.format_message()), e.exit_code)
    except KeyboardInterrupt:  # one raised outside a command's body (typer maps the others to 130)
        code = 130
    except typer.Abort:  # end of input at a prompt
        _fail("aborted (end of input)", 1)
    # a command's return value is not an exit code (None: success); typer.Exit's code is an int
    code = code if isinstance(code, int) else 0
    if code == 130:  # Ctrl-C: typer turns it into exit code 130, silently
        print("tpshard: interrupted", file=sys.stderr)
    # The process ends here: the interpreter's finalization would first walk every object left,
    # torch's too, in full collections that nothing needs (every output is closed and synced by
    # now; README, "Models bigger than memory"). A caller that runs main() in its own process:
    # see app.freeze_imported_objects.
    gc.freeze()
    sys.exit(code)


def _fail(message: str, code: int = 2) -> NoReturn:
    message = " ".join(message.split())  # one line, whatever the cause
    print(f"tpshard: error: {message}", file=sys.stderr)
    sys.exit(code)


def _command_path(ctx: typer.Context | None, commands: dict) -> str:
    """The command whose --help to suggest. click's parser raises some errors (an option without its
    value) with no context: then the command named on the command line, else the root."""
    if ctx is not None:
        return ctx.command_path
    words = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    return f"tpshard {words[0]}" if words and words[0] in commands else "tpshard"


def _sentence(message: str) -> str:
    """click's message ("Invalid value for '--tp': ...", "Missing option '--out'.") as a clause of
    tpshard's one line: lower-case start, like tpshard's own errors, no final full stop."""
    message = " ".join(message.split()).rstrip(".")
    if message[:2].isalpha() and message[0].isupper() and message[1].islower():
        message = message[0].lower() + message[1:]
    return message
