"""`tpshard split`, `merge` and `reshard`: the shard set on disk."""

import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from tpshard.cli.app import DType, app, byte_progress, expand_user, freeze_imported_objects, stderr, stdout
from tpshard.errors import TpshardError

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from tpshard.parallel.grid import ParallelDims, Stages


class MergeFormat(StrEnum):
    pt = "pt"
    safetensors = "safetensors"
    hf = "hf"
    dcp = "dcp"


def _layout(grid: "ParallelDims", stages: "Stages | None" = None) -> str:
    if grid.pp == 1:
        return f"tp {grid.tp}"
    return f"tp {grid.tp} x pp {grid.pp}" + (f" (layers {stages})" if stages else "")


def _files_table(manifest, directory: Path) -> Table:
    pipelined = manifest.grid.pp > 1
    table = Table()
    table.add_column("rank", justify="right")
    if pipelined:
        table.add_column("stage", justify="right")
        table.add_column("blocks")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for entry in manifest.files:
        where = []
        if pipelined:
            blocks = manifest.stage_plan.blocks(entry["stage"])
            where = [str(entry["stage"]), f"{blocks.start}-{blocks.stop - 1}"]
        cells = [str(directory / entry["file"]), f"{entry['bytes']:,}", entry["sha256"][:16]]
        table.add_row(str(entry["rank"]), *where, *cells)
    return table


@app.command()
def split(
    checkpoint: Path = typer.Argument(..., help="nanoGPT ckpt.pt (as train.py writes it).", callback=expand_user),
    tp: int = typer.Option(..., "--tp", help="Tensor-parallel size N; must divide n_head."),
    pp: int = typer.Option(
        1,
        "--pp",
        help="Pipeline stages P: each holds a contiguous range of blocks, split N ways inside the stage; stage 0 "
        "also holds wte and wpe, the last ln_f and its own copy of the (tied) output layer. N x P rank files.",
    ),
    stage_layers: str | None = typer.Option(
        None,
        "--stage-layers",
        help="Blocks per stage, e.g. 4,4,4 (P numbers, at least 1 each, n_layer in all). \\[default: balanced by "
        "bytes, the embeddings counted with the first and last stages]",
        show_default=False,
    ),
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
    """Split CHECKPOINT into N Megatron-style rank files (N x P with pipeline stages) plus a
    checksummed manifest.

    Attention q,k,v (per head) and the MLP's c_fc are split by output columns; both c_proj by input
    rows (their biases are added once, after the all-reduce); everything else is replicated. The
    optimizer state is left out and never read. The write is atomic: OUT appears only when complete.

    Examples:

        tpshard split ckpt.pt --tp 2 -o shards

        tpshard split ckpt.pt --tp 2 --pp 2 -o shards          (4 ranks: 2 stages of 2)

        tpshard split ckpt.pt --tp 1 --pp 3 --stage-layers 3,5,4 -o shards
    """
    from tpshard.files import digests

    digests.start(checkpoint)  # a ckpt.pt's sha256, for the manifest: hashed while torch is imported

    from tpshard.convert import choose_stages, planned_bytes, split_checkpoint, tokenizer_to_ship
    from tpshard.files.atomic import file_status
    from tpshard.files.paths import load_checkpoint
    from tpshard.files.tensorfile import DTYPES
    from tpshard.parallel.grid import ParallelDims, Stages

    ckpt = load_checkpoint(checkpoint)
    target = DTYPES[dtype.value] if dtype else None
    grid = ParallelDims(tp, pp)
    grid.check(ckpt.config)  # before anything is written, and before the stages (a bad --tp first)
    stages = choose_stages(ckpt.config, pp, Stages.parse(stage_layers) if stage_layers else None, tp, vocab_parallel)
    source_bytes = file_status(ckpt.path)[0] or 0  # hashed for the manifest (unreadable: hashing says so)
    total = planned_bytes(ckpt.config, target or ckpt.dtype, grid, stages, vocab_parallel) + source_bytes
    label = f"split into {_layout(grid)}"
    with tempfile.TemporaryDirectory() as scratch, byte_progress(label, total) as progress:
        tokenizer_file, why_none = tokenizer_to_ship(ckpt, tokenizer, Path(scratch))
        manifest = split_checkpoint(
            ckpt,
            tp,
            out,
            pp=pp,
            stage_layers=stages,
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
    layout = f"{_layout(grid, stages)}, {dtype or 'source dtype'}" + (", vocab-parallel" if vocab_parallel else "")
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
        "(config.json + model.safetensors) that transformers' GPT2LMHeadModel.from_pretrained loads; dcp: a "
        "PyTorch distributed checkpoint directory (nanoGPT's names, q, k, v of c_attn stacked as (3, C, C)) that "
        "torch.distributed.checkpoint.load reads into a plain or a tensor-parallel model, resharded on load. pt, "
        "safetensors and hf are written one tensor at a time (memory: about two of the largest tensor, not the "
        "model); dcp stores each rank's piece as a chunk of its tensor, straight from the rank files (nothing copied).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Reassemble the dense checkpoint from SHARDS, bit for bit.

    Every rank file is checked against the manifest's sha256, while the output is written: OUT
    appears only if they all match. The pt output is a nanoGPT ckpt.pt (model, model_args, iter_num,
    best_val_loss, config; wte and lm_head tied) that nanoGPT's sample.py loads; its optimizer entry
    is None, since shards carry no optimizer state.
    """
    from tpshard.files.manifest_file import start_hashing_rank_files

    if os.path.lexists(out) and not force:  # a dangling link or a link loop is a name taken too
        raise TpshardError(f"{out}: already exists; choose another output or pass --force to replace it")
    if out.is_dir() and format not in (MergeFormat.hf, MergeFormat.dcp):
        raise TpshardError(f"{out}: is a directory, expected a file name for the merged checkpoint")
    start_hashing_rank_files(shards)  # while torch is imported

    from tpshard.convert import merge_to
    from tpshard.files.shardset import ShardSet

    freeze_imported_objects()
    shard_set = ShardSet.open(shards)
    m = shard_set.manifest
    # written (dcp: lm_head too, wte's bytes), and the rank files hashed
    total = m.dense_bytes(tied_twice=format is MergeFormat.dcp) + sum(f["bytes"] for f in m.files)
    with byte_progress(f"write {out.name}, verify checksums", total) as progress:
        merge_to(shard_set, out, format.value, force=force, progress=progress)
    files = shard_set.manifest.grid.world_size
    stdout.print(f"merged {files} rank file{'s' * (files > 1)} -> {out} ({format.value}, checksums verified)")


@app.command()
def reshard(
    shards: Path = typer.Argument(..., help="Shard directory written by split or reshard.", callback=expand_user),
    tp: int = typer.Option(..., "--tp", help="New tensor-parallel size M; must divide n_head."),
    pp: int | None = typer.Option(
        None, "--pp", help="New pipeline stages. \\[default: the set's]", show_default=False
    ),
    stage_layers: str | None = typer.Option(
        None,
        "--stage-layers",
        help="Blocks per new stage, e.g. 4,4,4. \\[default: the set's for the same --pp, else balanced by bytes]",
        show_default=False,
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory for the new shard set.", callback=expand_user),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Turn a shard set of one grid (tp x pp) into another directly, tensor by tensor (no dense
    checkpoint).

    The rank files are byte-identical to splitting the original checkpoint with the new grid.
    """
    from tpshard.files.manifest_file import start_hashing_rank_files

    start_hashing_rank_files(shards)  # while torch is imported

    from tpshard.convert import choose_stages, planned_bytes
    from tpshard.convert import reshard as reshard_set
    from tpshard.files.shardset import ShardSet
    from tpshard.parallel.grid import ParallelDims, Stages

    shard_set = ShardSet.open(shards)
    m = shard_set.manifest
    pp = m.grid.pp if pp is None else pp
    grid = ParallelDims(tp, pp)
    grid.check(m.config)
    if stage_layers is not None:
        stages = choose_stages(m.config, pp, Stages.parse(stage_layers))
    else:
        stages = m.stage_plan if pp == m.grid.pp else choose_stages(m.config, pp, None, tp, m.vocab_parallel)
    # written, and the old rank files hashed
    total = planned_bytes(m.config, m.dtype, grid, stages, m.vocab_parallel) + sum(f["bytes"] for f in m.files)
    with byte_progress(f"reshard {_layout(m.grid)} -> {_layout(grid)}", total) as progress:
        manifest = reshard_set(shard_set, tp, out, pp=pp, stage_layers=stages, force=force, progress=progress)
    stdout.print(f"{shards} ({_layout(m.grid, m.stages)}) -> {out} ({_layout(grid, stages)})")
    stdout.print(_files_table(manifest, out))
