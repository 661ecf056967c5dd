"""The typer app and what every command shares: the stderr console, errors, progress bars.

Nothing here imports torch: `tpshard --help` and `--version` must answer at once. Commands import the
core inside their bodies.
"""

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from tpshard import __version__

# markup off: paths are user data, and a directory named "a[/]b" must print as itself, not raise MarkupError
stderr = Console(stderr=True, highlight=False, markup=False)
stdout = Console(highlight=False, markup=False)

app = typer.Typer(
    name="tpshard",
    help=(
        "Split a nanoGPT checkpoint into Megatron-style tensor-parallel shards, put them back together, "
        "run them (simulated in one process or distributed with torch.distributed), and prove that "
        "nothing changed.\n\n"
        "Typical flow: inspect -> split -> verify -> generate. Exit codes: 0 ok, 1 a verification "
        "failed, 2 bad input or usage."
    ),
    invoke_without_command=True,  # `tpshard` alone: _root prints the short overview below, exit 2
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tpshard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if ctx.invoked_subcommand is None:
        # no command is a usage error: a few lines that say what to type next, not the whole --help
        typer.echo(overview(ctx), err=True)
        raise typer.Exit(2)


def overview(ctx: typer.Context) -> str:
    """`tpshard` with no command: the usage line and each command's one-line summary (stderr)."""
    group = ctx.command
    names = group.list_commands(ctx)  # type: ignore[attr-defined]
    width = max(map(len, names))
    lines = [f"usage: {ctx.command_path} COMMAND [ARGS]... (typical flow: inspect -> split -> verify -> generate)"]
    for name in names:
        summary = group.get_command(ctx, name).get_short_help_str(limit=80)  # type: ignore[attr-defined]
        lines.append(f"  {name:<{width}}  {summary}")
    lines.append(f"'{ctx.command_path} COMMAND --help' for a command's options, '{ctx.command_path} --help' for more")
    return "\n".join(lines)


def freeze_imported_objects() -> None:
    """Once a command has imported the core: the objects of torch's import (some hundred thousand, alive
    as long as the process) are put out of the collector's reach (gc.freeze), so that the full
    collections the command's own work sets off no longer walk them all: DCP's import and planner set
    off several. What the command makes later is collected as before. The CLI's only: the library
    leaves its caller's collector alone (main() freezes the rest at the end; a caller that runs it in
    its own process, the tests, gets its objects back with gc.unfreeze())."""
    gc.freeze()


def expand_user(path: Path) -> Path:
    """Paths are checked by the core, which words the errors; this only expands '~'."""
    return path.expanduser()


class DType(StrEnum):
    """--dtype: what split stores and generate computes in."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Comm(StrEnum):
    """--comm: what carries a distributed run's tensor-parallel collectives (comm/choose.py)."""

    auto = "auto"
    shm = "shm"
    gloo = "gloo"


COMM_HELP = (
    "Distributed: the tensor-parallel collectives. shm: through shared memory (CPU, every rank of a stage on "
    "this host, a core each; microseconds a call); gloo: gloo over the network stack (NCCL on CUDA); auto: shm "
    "where it can serve, else gloo. Stages always hand over by send/recv."
)


SEQUENCE_PARALLEL_HELP = (
    "Megatron's sequence parallelism for every forward of more than one token (the prompt, and each window "
    "recomputed once the text outgrows block_size): between the sync points each rank holds its chunk of the "
    "sequence (LayerNorms and residual adds on 1/tp of the positions), each all-reduce becomes a reduce-scatter "
    "and an all-gather brings the sequence back before attention and the MLP, a piece of a few hundred positions "
    "at a time, so that no rank holds the whole prompt's activations. A length tp does not divide is padded at "
    "the end. One-token decode steps keep the tensor-parallel schedule. Needs tp 2 or more. Logits equal "
    "the tensor-parallel and dense ones to rounding."
)


THREADS_HELP = (
    "CPU threads per process (per rank when distributed). \\[default: OMP_NUM_THREADS if set, else 1 for a "
    "model of under 5M parameters per process, else the CPUs idle at start shared among the ranks]"
)


@contextmanager
def byte_progress(description: str, total: int, *, enabled: bool = True) -> Iterator:
    """A progress bar on stderr, shown only on a terminal and for work large enough to wait for."""
    show = enabled and stderr.is_terminal and total >= 32 << 20
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not show,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
