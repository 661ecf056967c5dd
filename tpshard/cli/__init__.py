"""The command-line face of tpshard: parse, call the core, render. See app.py."""

import sys

from tpshard.cli import convert, generate, inspect, verify  # noqa: F401  (registers the commands)
from tpshard.cli.app import app
from tpshard.errors import TpshardError


def main() -> None:
    try:
        app()
    except TpshardError as e:
        message = " ".join(str(e).split())  # one line, whatever the cause
        print(f"tpshard: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tpshard: interrupted", file=sys.stderr)
        sys.exit(130)
