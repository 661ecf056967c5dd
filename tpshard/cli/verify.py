"""`tpshard verify`."""

import typer

from tpshard.cli.app import app


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def verify(ctx: typer.Context) -> None:
    """Not implemented yet."""
    typer.echo("tpshard verify: not implemented yet", err=True)
    raise typer.Exit(2)
