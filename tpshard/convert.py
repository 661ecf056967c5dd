"""split, merge and reshard: whole shard sets written or read back, following the split rules of
parallel/plan.py tensor by tensor, so that no step holds the model twice."""

from pathlib import Path

import torch

from tpshard.errors import TpshardError
from tpshard.files.atomic import file_status, input_files, refuse_output_over_inputs
from tpshard.files.checkpoint import Checkpoint, training_record
from tpshard.files.shardset import (
    BPE_TOKENIZER,
    CHAR_TOKENIZER,
    Manifest,
    ShardSet,
    tensor_table,
    write_shard_set,
)
from tpshard.files.tensorfile import DTYPE_NAMES, BackgroundHash, Progress
from tpshard.parallel import plan
from tpshard.parallel.grid import ParallelDims
from tpshard.tokenizer import CharTokenizer, find_tokenizer, load_tokenizer_file


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
    """Split a dense checkpoint into tp_size rank files (optimizer state is left out). tokenizer_file
    (a meta.pkl or a ranks file, under any name) is loaded, and shipped under the name of its kind."""
    grid = ParallelDims(tp_size)
    grid.check(checkpoint.config)
    refuse_output_over_inputs(out_dir, [*input_files(checkpoint.path), *([tokenizer_file] if tokenizer_file else [])])
    tokenizer_name = shipped_tokenizer_name(tokenizer_file) if tokenizer_file is not None else None
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
            "file": as_text(checkpoint.path.name),
            "sha256": source_hash.get(),
            "iter_num": checkpoint.iter_num,
            "best_val_loss": checkpoint.best_val_loss,
            "config": checkpoint.train_config,
            "optimizer_left_out": checkpoint.has_optimizer,
            "source_dtype": DTYPE_NAMES.get(checkpoint.dtype, str(checkpoint.dtype)),
        }

    return write_shard_set(
        out_dir,
        manifest,
        piece,
        describe_source,
        force=force,
        tokenizer_file=tokenizer_file,
        tokenizer_name=tokenizer_name,
        progress=progress,
    )


def shipped_tokenizer_name(path: Path) -> str:
    """The name a tokenizer file gets in a shard set, from what it is (loaded, so a file that is no
    tokenizer is refused here, before anything is written): never the user's own name."""
    return CHAR_TOKENIZER if isinstance(load_tokenizer_file(path), CharTokenizer) else BPE_TOKENIZER


def as_text(name: str) -> str:
    """A file name as JSON text: the bytes that are not UTF-8 (Python holds them as lone surrogates, which a
    manifest must not) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
        ranks_file = scratch / BPE_TOKENIZER
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
    tokenizer = shards.tokenizer_path
    refuse_output_over_inputs(out_dir, input_files(shards.directory))  # a rank file may be a link to elsewhere
    tokenizer_name = None
    if tokenizer is not None:  # copied last: say what is wrong with it before the long write
        _, problem = file_status(tokenizer)
        if problem:
            raise TpshardError(f"{tokenizer}: the manifest's tokenizer file is {problem}; restore it or re-split")
        try:  # a set written before the shipped names were fixed may call it anything: renamed here
            tokenizer_name = shipped_tokenizer_name(tokenizer)
        except TpshardError as e:
            raise TpshardError(f"{e}; the shard set's tokenizer is damaged: restore it or re-split") from None
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
        tokenizer_file=tokenizer,
        tokenizer_name=tokenizer_name,
        progress=progress,
    )
