"""The entry point: every command registered, and every failure turned into one line and an exit code."""

import os
import sys

from tpshard.cli import convert, describe, generate, verify  # noqa: F401  (registers the commands)
from tpshard.cli.app import app
from tpshard.errors import TpshardError


def main() -> None:
    # c10d logs its own errors (a lost peer, a store that does not answer) as extra lines on stderr;
    # tpshard reports each failure as one line. Read when torch loads, which commands do lazily.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    try:
        app()
    except TpshardError as e:
        message = " ".join(str(e).split())  # one line, whatever the cause
        print(f"tpshard: error: {message}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C into exit code 130, silently
            print("tpshard: interrupted", file=sys.stderr)
        raise
