"""`tpshard inspect`."""

import typer

from tpshard.cli.app import app


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def inspect(ctx: typer.Context) -> None:
    """Not implemented yet."""
    typer.echo("tpshard inspect: not implemented yet", err=True)
    raise typer.Exit(2)
