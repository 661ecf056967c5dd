"""`tpshard split`, `merge` and `reshard`: the shard set on disk."""

import os
import tempfile
from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tpshard.cli.app import DType, app, byte_progress, expand_user, stderr, stdout
from tpshard.errors import TpshardError


class MergeFormat(StrEnum):
    pt = "pt"
    safetensors = "safetensors"
    hf = "hf"


def _files_table(manifest, directory: Path) -> Table:
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for entry in manifest.files:
        table.add_row(str(entry["rank"]), str(directory / entry["file"]), f"{entry['bytes']:,}", entry["sha256"][:16])
    return table


@app.command()
def split(
    checkpoint: Path = typer.Argument(..., help="nanoGPT ckpt.pt (as train.py writes it).", callback=expand_user),
    tp: int = typer.Option(..., "--tp", help="Tensor-parallel size N; must divide n_head."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory for the shard set.", callback=expand_user),
    dtype: DType | None = typer.Option(None, help="Store the shards in this dtype (default: the checkpoint's)."),
    tokenizer: Path | None = typer.Option(None, help="Tokenizer to ship with the shards (meta.pkl or .tiktoken)."),
    vocab_parallel: bool = typer.Option(
        False,
        "--vocab-parallel",
        help="Also split wte / lm_head by vocabulary rows (Megatron's VocabParallelEmbedding), padded to a "
        "multiple of N: each rank holds 1/N of the largest tensor, at the cost of one more reduction per forward.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Split CHECKPOINT into N Megatron-style rank files plus a checksummed manifest.

    Attention q,k,v (per head) and the MLP's c_fc are split by output columns; both c_proj by input
    rows (their biases are added once, after the all-reduce); everything else is replicated. The
    optimizer state is left out and never read. The write is atomic: OUT appears only when complete.
    """
    from tpshard.convert import split_checkpoint, tokenizer_to_ship
    from tpshard.files.paths import load_checkpoint
    from tpshard.files.tensorfile import DTYPES

    ckpt = load_checkpoint(checkpoint)
    target = DTYPES[dtype.value] if dtype else None
    total = tp * sum(t.numel() * (target or ckpt.dtype).itemsize for t in ckpt.state_dict.values())
    with tempfile.TemporaryDirectory() as scratch, byte_progress(f"split into {tp}", total) as progress:
        tokenizer_file, why_none = tokenizer_to_ship(ckpt, tokenizer, Path(scratch))
        manifest = split_checkpoint(
            ckpt,
            tp,
            out,
            dtype=target,
            vocab_parallel=vocab_parallel,
            force=force,
            tokenizer_file=tokenizer_file,
            progress=progress,
        )
    if why_none:  # the reason matters: none found, or one found and refused (a meta.pkl that would run code)
        # said once the set is written: a split refused afterwards (a bad --tp, -o over an input) is one line
        note = f"[yellow]note:[/] {escape(why_none)}; the shard set ships without a tokenizer"
        stderr.print(note, markup=True, soft_wrap=True)
    layout = f"tp {tp}, {dtype or 'source dtype'}" + (", vocab-parallel" if vocab_parallel else "")
    stdout.print(f"{checkpoint} -> {out} ({layout})")
    stdout.print(_files_table(manifest, out))
    if ckpt.has_optimizer:
        stdout.print("optimizer state left out (not needed for inference; it was never read)")
    if manifest.tokenizer:
        stdout.print(f"tokenizer copied: {out / manifest.tokenizer}")


@app.command()
def merge(
    shards: Path = typer.Argument(..., help="Shard directory written by split or reshard.", callback=expand_user),
    out: Path = typer.Option(..., "-o", "--out", help="Dense checkpoint to write.", callback=expand_user),
    format: MergeFormat = typer.Option(
        MergeFormat.pt,
        "--format",
        help="pt: nanoGPT ckpt.pt; safetensors: one dense file; hf: a Hugging Face GPT-2 directory "
        "(config.json + model.safetensors) that transformers' GPT2LMHeadModel.from_pretrained loads.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Reassemble the dense checkpoint from SHARDS, bit for bit.

    Every rank file is checked against the manifest's sha256 first. The pt output is a nanoGPT
    ckpt.pt (model, model_args, iter_num, best_val_loss, config; wte and lm_head tied) that nanoGPT's
    sample.py loads; its optimizer entry is None, since shards carry no optimizer state.
    """
    from tpshard.convert import merge_shards
    from tpshard.files.atomic import input_files, refuse_output_over_inputs
    from tpshard.files.dense_safetensors import save_safetensors
    from tpshard.files.hf import save_hf
    from tpshard.files.nanogpt import save_checkpoint
    from tpshard.files.shardset import ShardSet

    if os.path.lexists(out) and not force:  # a dangling link or a link loop is a name taken too
        raise TpshardError(f"{out}: already exists; choose another output or pass --force to replace it")
    if out.is_dir() and format is not MergeFormat.hf:
        raise TpshardError(f"{out}: is a directory, expected a file name for the merged checkpoint")
    shard_set = ShardSet.open(shards)
    refuse_output_over_inputs(out, input_files(shard_set.directory))
    total = sum(f["bytes"] for f in shard_set.manifest.files)
    with byte_progress("verify checksums", total) as progress:
        ckpt = merge_shards(shard_set, progress=progress)
    if format is MergeFormat.hf:
        save_hf(ckpt, out, force=force)
    else:
        (save_checkpoint if format is MergeFormat.pt else save_safetensors)(ckpt, out)
    stdout.print(f"merged {shard_set.tp_size} shards -> {out} ({format.value}, checksums verified)")


@app.command()
def reshard(
    shards: Path = typer.Argument(..., help="Shard directory written by split or reshard.", callback=expand_user),
    tp: int = typer.Option(..., "--tp", help="New tensor-parallel size M; must divide n_head."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory for the new shard set.", callback=expand_user),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Turn an N-way shard set into an M-way one directly, tensor by tensor (no dense checkpoint).

    The result is byte-identical to splitting the original checkpoint M ways.
    """
    from tpshard.convert import reshard as reshard_set
    from tpshard.files.shardset import ShardSet

    shard_set = ShardSet.open(shards)
    total = tp * shard_set.manifest.dense_bytes()
    with byte_progress(f"reshard {shard_set.tp_size} -> {tp}", total) as progress:
        manifest = reshard_set(shard_set, tp, out, force=force, progress=progress)
    stdout.print(f"{shards} (tp {shard_set.tp_size}) -> {out} (tp {tp})")
    stdout.print(_files_table(manifest, out))
