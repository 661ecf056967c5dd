"""split, merge and reshard: whole shard sets written or read back, following the split rules of
parallel/plan.py tensor by tensor, so that no step holds the model twice."""

from pathlib import Path

import torch

from tpshard.errors import TpshardError
from tpshard.files.atomic import refuse_output_over_inputs
from tpshard.files.checkpoint import Checkpoint, training_record
from tpshard.files.shardset import Manifest, ShardSet, tensor_table, write_shard_set
from tpshard.files.tensorfile import DTYPE_NAMES, BackgroundHash, Progress
from tpshard.parallel import plan
from tpshard.parallel.grid import ParallelDims
from tpshard.tokenizer import find_tokenizer


def split_checkpoint(
    checkpoint: Checkpoint,
    tp_size: int,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    vocab_parallel: bool = False,
    force: bool = False,
    tokenizer_file: Path | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Split a dense checkpoint into tp_size rank files (optimizer state is left out)."""
    grid = ParallelDims(tp_size)
    grid.check(checkpoint.config)
    refuse_output_over_inputs(out_dir, [checkpoint.path, *([tokenizer_file] if tokenizer_file else [])])
    dtype = dtype or checkpoint.dtype
    source_hash = BackgroundHash(checkpoint.path)
    manifest = Manifest(
        grid=grid,
        config=checkpoint.config,
        dtype=dtype,
        tensors=tensor_table(checkpoint.config, vocab_parallel),
        files=[],
        source={},
        vocab_parallel=vocab_parallel,
    )

    def piece(name: str, rank: int) -> torch.Tensor:
        return plan.shard(name, checkpoint.state_dict[name], rank, tp_size, vocab_parallel).to(dtype)

    def describe_source() -> dict:
        return {
            "file": checkpoint.path.name,
            "sha256": source_hash.get(),
            "iter_num": checkpoint.iter_num,
            "best_val_loss": checkpoint.best_val_loss,
            "config": checkpoint.train_config,
            "optimizer_left_out": checkpoint.has_optimizer,
            "source_dtype": DTYPE_NAMES.get(checkpoint.dtype, str(checkpoint.dtype)),
        }

    return write_shard_set(
        out_dir, manifest, piece, describe_source, force=force, tokenizer_file=tokenizer_file, progress=progress
    )


def tokenizer_to_ship(checkpoint: Checkpoint, explicit: Path | None, scratch: Path) -> tuple[Path | None, str | None]:
    """The tokenizer file that goes into a shard set, so that it is self-contained, or (None, why not).
    A tokenizer with no single file of its own (an HF vocab.json + merges.txt) is saved to scratch as a
    ranks file. An explicit tokenizer that fails raises."""
    try:
        tok = find_tokenizer(
            checkpoint.path,
            dataset=checkpoint.train_config.get("dataset"),
            vocab_size=checkpoint.config.vocab_size,
            explicit=explicit,
        )
    except TpshardError as e:
        if explicit is not None:
            raise
        return None, " ".join(str(e).split())
    if tok.source is None and getattr(tok, "ranks", None) is not None:  # e.g. an HF vocab.json + merges.txt
        ranks_file = scratch / "gpt2.tiktoken"
        tok.save_ranks(ranks_file)
        return ranks_file, None
    return tok.source, None


def merge_shards(shards: ShardSet, *, checksum: bool = True, progress: Progress | None = None) -> Checkpoint:
    """The dense checkpoint back from every rank's file (each checked against its sha256 first, unless
    checksum=False: the caller just did)."""
    for rank in range(shards.tp_size):
        shards.check_file(rank, checksum=checksum, progress=progress)
    pieces = shards.load_pieces(list(range(shards.tp_size)), checksum=False)
    state = {name: shards.manifest.unshard(name, ranks).contiguous() for name, ranks in pieces.items()}
    for tied, source in plan.TIED.items():
        state[tied] = state[source]
    return Checkpoint(
        path=shards.directory,
        config=shards.manifest.config,
        state_dict=state,
        **training_record(shards.manifest.source, shards.directory),
    )


def reshard(
    shards: ShardSet, tp_size: int, out_dir: Path, *, force: bool = False, progress: Progress | None = None
) -> Manifest:
    """N -> M directly: each tensor is reassembled from the old pieces and cut for the new ranks,
    one tensor at a time, without a dense checkpoint on disk."""
    grid = ParallelDims(tp_size)
    grid.check(shards.manifest.config)
    refuse_output_over_inputs(out_dir, [shards.directory])
    tokenizer = shards.tokenizer_path
    if tokenizer is not None and not tokenizer.is_file():  # copied last: say so before the long write
        raise TpshardError(f"{tokenizer}: the manifest's tokenizer file is missing; restore it or re-split")
    for rank in range(shards.tp_size):
        shards.check_file(rank)
    old = shards.load_pieces(list(range(shards.tp_size)), checksum=False)
    m = shards.manifest
    manifest = Manifest(grid, m.config, m.dtype, m.tensors, [], {}, vocab_parallel=m.vocab_parallel)
    return write_shard_set(
        out_dir,
        manifest,
        lambda name, rank: plan.shard(name, m.unshard(name, old[name]), rank, tp_size, m.vocab_parallel),
        lambda: {**m.source, "resharded_from_tp": m.tp_size},
        force=force,
        tokenizer_file=shards.tokenizer_path,
        progress=progress,
    )
