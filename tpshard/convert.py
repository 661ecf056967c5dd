"""split, merge and reshard: whole shard sets written or read back, following the split rules of
parallel/plan.py tensor by tensor, so that no step holds the model twice."""

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError
from tpshard.files.atomic import file_status, input_files, refuse_output_over_inputs
from tpshard.files.checkpoint import Checkpoint, training_record
from tpshard.files.dcp import Boxes, save_dcp, stored_shape
from tpshard.files.dense_safetensors import save_safetensors
from tpshard.files.digests import FileHash, take
from tpshard.files.hf import save_hf
from tpshard.files.nanogpt import save_checkpoint
from tpshard.files.pages import drop_file_pages, shares_memory
from tpshard.files.shardset import (
    BPE_TOKENIZER,
    CHAR_TOKENIZER,
    Manifest,
    ShardSet,
    tensor_table,
    write_shard_set,
)
from tpshard.files.tensorfile import DTYPE_NAMES, Progress, TensorSource
from tpshard.parallel import plan
from tpshard.parallel.grid import ParallelDims, Stages
from tpshard.tokenizer import CharTokenizer, find_tokenizer, load_tokenizer_file


def choose_stages(
    config: GPTConfig, pp: int, stage_layers: Stages | None = None, tp: int = 1, vocab_parallel: bool = False
) -> Stages:
    """The blocks of each of pp stages: stage_layers as given (checked), else balanced by the bytes
    of a rank."""
    ParallelDims(1, pp).check(config)
    if stage_layers is None:
        return plan.balanced_stages(config, pp, tp, vocab_parallel)
    if stage_layers.pp != pp:
        raise TpshardError(f"--stage-layers {stage_layers}: {stage_layers.pp} stages given for --pp {pp}")
    stage_layers.check(config)
    return stage_layers


def planned_bytes(
    config: GPTConfig, dtype: torch.dtype, grid: ParallelDims, stages: Stages, vocab_parallel: bool = False
) -> int:
    """The tensor bytes a split or reshard to this grid writes, every rank file together."""
    tensors = tensor_table(config, vocab_parallel, grid.pp)
    manifest = Manifest(grid, config, dtype, tensors, [], {}, vocab_parallel=vocab_parallel, stages=stages)
    layouts = (manifest.layout(rank) for rank in range(grid.world_size))
    return sum(dtype.itemsize * math.prod(shape) for layout in layouts for _, _, shape in layout)


def split_checkpoint(
    checkpoint: Checkpoint,
    tp_size: int,
    out_dir: Path,
    *,
    pp: int = 1,
    stage_layers: Stages | None = None,
    dtype: torch.dtype | None = None,
    vocab_parallel: bool = False,
    force: bool = False,
    tokenizer_file: Path | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Split a dense checkpoint into tp_size x pp rank files (optimizer state is left out): pp
    pipeline stages of stage_layers blocks each (default: balanced by bytes), each split tp_size
    ways. tokenizer_file (a meta.pkl or a ranks file, under any name) is loaded, and shipped under
    the name of its kind. progress: the bytes written, and those of the source hashed for the manifest."""
    grid = ParallelDims(tp_size, pp)
    grid.check(checkpoint.config)
    stages = choose_stages(checkpoint.config, pp, stage_layers, tp_size, vocab_parallel)
    refuse_output_over_inputs(out_dir, [*input_files(checkpoint.path), *([tokenizer_file] if tokenizer_file else [])])
    tokenizer_name = shipped_tokenizer_name(tokenizer_file) if tokenizer_file is not None else None
    dtype = dtype or checkpoint.dtype
    source_hash = take(checkpoint.path)
    source_hash.attach(progress)
    manifest = Manifest(
        grid=grid,
        config=checkpoint.config,
        dtype=dtype,
        tensors=tensor_table(checkpoint.config, vocab_parallel, pp),
        files=[],
        source={},
        vocab_parallel=vocab_parallel,
        stages=stages,
    )

    def piece(name: str, rank: int) -> torch.Tensor:
        dense = checkpoint.state_dict[plan.TIED.get(name, name)]  # the last stage's lm_head: wte's copy
        return _piece(name, dense, grid.coordinates(rank)[1], tp_size, vocab_parallel, dtype)

    def describe_source() -> dict:
        return {
            "file": as_text(checkpoint.path.name),
            "sha256": _source_digest(source_hash),
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


def _source_digest(source_hash: FileHash) -> str:
    try:
        return source_hash.digest()
    except OSError as e:
        raise TpshardError(f"{e.filename}: cannot read to hash it ({e.strerror})") from None


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


def _piece(
    name: str, dense: torch.Tensor, tp_rank: int, tp_size: int, vocab_parallel: bool, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """One rank's piece of a dense tensor, for a rank file: a view of the dense tensor where the piece
    lies whole in it (its box, plan.piece_box: a q, k, v piece as (3, rows, ...), which holds its
    elements in order), else plan.shard's (a vocabulary-padded piece). When the piece is a copy (padded,
    cast), the dense tensor's memory-mapped pages are released now; a view's are released by the writer
    once written."""
    shape = plan.shard(name, dense.to("meta"), tp_rank, tp_size, vocab_parallel)  # its shape alone
    found = plan.piece_box(name, shape, tp_rank, vocab_parallel, dense.size(0))
    if found is not None and found[1].numel() == shape.numel():
        piece = _box(dense.view(stored_shape(name, tuple(dense.shape))), *found)
    else:
        piece = plan.shard(name, dense, tp_rank, tp_size, vocab_parallel)
    piece = piece if dtype is None else piece.to(dtype)
    if not shares_memory(piece, dense):
        drop_file_pages(dense)
    return piece


def _box(tensor: torch.Tensor, offsets: tuple[int, ...], box: torch.Tensor) -> torch.Tensor:
    """The view of tensor that box, at offsets, covers."""
    return tensor[tuple(slice(at, at + size) for at, size in zip(offsets, box.shape, strict=True))]


class RankFileChecks:
    """Every rank file against the manifest: its size and header at once, its sha256 (unless
    checksum=False) hashed on background threads (digests: side by side, a core left free), while the caller
    goes on to read them; confirm() waits for the hashes. A failure is the one that checking each file
    whole, in rank order, finds first: the first failing rank; its size, then its sha256, then its
    header. progress: the bytes hashed."""

    def __init__(self, shards: ShardSet, *, checksum: bool = True, progress: Progress | None = None):
        self.shards = shards
        ranks = range(shards.manifest.grid.world_size)
        self.hashes = [take(shards.rank_path(rank)) for rank in ranks] if checksum else []
        for digest in self.hashes:
            digest.attach(progress)
        for rank in ranks:
            try:
                shards.check_file(rank, checksum=False)
            except TpshardError:
                for earlier in ranks[: rank + 1] if checksum else ():  # what the eager check raises first
                    shards.check_file(earlier, digest=self.hashes[earlier])
                raise

    def confirm(self) -> None:
        """Wait for the rank files' sha256; raise the first, in rank order, that differs from the
        manifest, could not be read, or whose file changed since it was hashed (replaced or written
        to: what was read from it may not be what was hashed)."""
        for rank, digest in enumerate(self.hashes):
            self.shards.check_sha256(rank, digest)

    @contextmanager
    def confirm_on_error(self) -> Iterator[None]:
        """Within it, a TpshardError (about what the rank files hold) gives way to confirm()'s, if a
        sha256 differs: the cause, and what an eager check would have said."""
        try:
            yield
        except TpshardError:
            self.confirm()
            raise


def mapped_pieces(shards: ShardSet) -> dict[str, list[torch.Tensor]]:
    """Every rank's pieces, memory-mapped (load_pieces, the files' sha256 not checked again; the pages
    that mapping them touched dropped: tensorfile.read_tensors)."""
    return shards.load_pieces(list(range(shards.manifest.grid.world_size)), checksum=False)


def dense_tensors(shards: ShardSet, *, reuse: bool = False) -> TensorSource:
    """A shard set's dense tensors, nanoGPT's names, each put together from its memory-mapped pieces
    only when asked for, and kept by no one here: a tensor split across ranks is copied out then and
    its pieces' pages released; a replicated one is rank 0's piece itself (a view of its file). With
    reuse (merge_to's: tpshard's writers are done with each tensor once they ask for the one after the
    next, tensorfile.made_ahead), the tensors are put together in two blocks of memory in turn, no
    fresh pages to fault in each time: a tensor kept longer changes under its holder. The last stage's
    copy of the tied embedding is checked first, then left out; lm_head.weight is wte. The rank files
    are not checked here (RankFileChecks)."""
    m = shards.manifest
    pieces = _untied(shards, mapped_pieces(shards))
    layout = [(name, m.dtype, tuple(m.tensors[name]["shape"])) for name in pieces]
    layout += [(tied, m.dtype, tuple(m.tensors[source]["shape"])) for tied, source in plan.TIED.items()]
    reused = _Reused() if reuse else None

    def make(name: str) -> torch.Tensor:
        stored = plan.TIED.get(name, name)
        ranks = pieces[stored]
        if len(ranks) == 1 or plan.rule_for(stored, m.vocab_parallel) is plan.Rule.REPLICATED:
            return ranks[0]
        shape = tuple(m.tensors[stored]["shape"])
        if reused is None:
            dense = m.unshard(stored, ranks).contiguous()
        else:
            dense = _put_together(m, stored, ranks, reused.take(shape, m.dtype))
        for piece in ranks:
            drop_file_pages(piece)
        return dense

    return TensorSource(layout, make, reused=reuse)


class _Reused:
    """Two blocks of memory, each grown to the largest tensor asked of it, that the tensors are made in
    by turns."""

    def __init__(self) -> None:
        self.blocks = [torch.empty(0, dtype=torch.uint8) for _ in range(2)]
        self.turn = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape) * dtype.itemsize
        turn, self.turn = self.turn, 1 - self.turn
        if self.blocks[turn].numel() < size:
            self.blocks[turn] = torch.empty(0, dtype=torch.uint8)  # the old block freed before the new is made
            self.blocks[turn] = torch.empty(size, dtype=torch.uint8)
        return self.blocks[turn][:size].view(dtype).view(shape)


def _put_together(m: Manifest, name: str, pieces: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """m.unshard(name, pieces), written into out: each piece copied into its box (plan.piece_box, in
    the stacked shape that makes a q, k, v piece one box)."""
    dense = out.view(stored_shape(name, tuple(out.shape)))
    for rank, piece in enumerate(pieces):
        found = plan.piece_box(name, piece, rank, m.vocab_parallel, m.config.vocab_size)
        if found is not None:
            _box(dense, *found).copy_(found[1])
    return out


def dcp_boxes(shards: ShardSet) -> Boxes:
    """A shard set's dense tensors as the boxes its pieces are in (plan.piece_box), in the shapes of
    tpshard's DCP export (q, k, v stacked): each a memory-mapped piece or a view of one, so that a DCP
    writer stores them with nothing copied. The last stage's copy of the tied embedding is checked
    first, then written as wte's boxes; the rank files are not checked here (RankFileChecks)."""
    m = shards.manifest
    pieces = _untied(shards, mapped_pieces(shards))
    boxes: Boxes = {}
    for name, ranks in pieces.items():
        found = [plan.piece_box(name, piece, r, m.vocab_parallel, m.config.vocab_size) for r, piece in enumerate(ranks)]
        boxes[name] = (stored_shape(name, tuple(m.tensors[name]["shape"])), [box for box in found if box is not None])
    for tied, source in plan.TIED.items():
        boxes[tied] = boxes[source]
    return boxes


def merged_checkpoint(shards: ShardSet, *, checksum: bool = True, progress: Progress | None = None) -> Checkpoint:
    """The dense checkpoint of a shard set, its state_dict made tensor by tensor when asked for, each in
    memory of its own (dense_tensors): what a caller streams, holding one tensor at a time. Every rank
    file is checked against its sha256 first, unless checksum=False (the caller just did). To write it
    to disk, merge_to: the same tensors, in reused memory, checked while they are written."""
    RankFileChecks(shards, checksum=checksum, progress=progress).confirm()
    return _checkpoint(shards, dense_tensors(shards))


def merge_shards(shards: ShardSet, *, checksum: bool = True, progress: Progress | None = None) -> Checkpoint:
    """The dense checkpoint back from every rank's file, every tensor in memory (each file checked
    against its sha256 first, unless checksum=False: the caller just did)."""
    merged = merged_checkpoint(shards, checksum=checksum, progress=progress)
    state = {name: merged.state_dict[name] for name in merged.state_dict if name not in plan.TIED}
    for tied, source in plan.TIED.items():
        state[tied] = state[source]
    return replace(merged, state_dict=state)


MERGE_FORMATS = ("pt", "safetensors", "hf", "dcp")


def merge_to(
    shards: ShardSet, out: Path, format: str, *, force: bool = False, progress: Progress | None = None
) -> None:
    """Write a shard set's dense checkpoint to out, all or nothing, as format (MERGE_FORMATS: nanoGPT's
    ckpt.pt, one dense safetensors file, an HF GPT-2 directory, a DCP directory). Its tensors are put
    together one at a time in two blocks of reused memory (dense_tensors, reuse: each writer is done
    with a tensor before the one after the next is made); every rank file's size and header are checked
    first, its sha256 while the output is written, before out takes its name (RankFileChecks). force:
    replace an existing hf or dcp directory (a file output is replaced: the CLI refuses one first
    without --force). progress: the bytes written and hashed."""
    if format not in MERGE_FORMATS:
        raise ValueError(f"format {format!r} is not one of {MERGE_FORMATS}")
    refuse_output_over_inputs(out, input_files(shards.directory))
    checks = RankFileChecks(shards, progress=progress)
    with checks.confirm_on_error():
        merged = _checkpoint(shards, dense_tensors(shards, reuse=True))
        boxes = dcp_boxes(shards) if format == "dcp" else None
    done = checks.confirm
    if format == "pt":
        save_checkpoint(merged, out, progress, before_rename=done)
    elif format == "safetensors":
        save_safetensors(merged, out, progress, before_rename=done)
    elif format == "hf":
        save_hf(merged, out, force=force, progress=progress, before_rename=done)
    else:
        tokenizer = shards.tokenizer_path
        save_dcp(merged, out, force=force, tokenizer_file=tokenizer, boxes=boxes, progress=progress, before_rename=done)


def _checkpoint(shards: ShardSet, tensors: Mapping[str, torch.Tensor]) -> Checkpoint:
    return Checkpoint(
        path=shards.directory,
        config=shards.manifest.config,
        state_dict=tensors,
        **training_record(shards.manifest.source, shards.directory),
    )


def _untied(shards: ShardSet, pieces: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """The pieces without the last stage's copy of the tied embedding, once it is checked to be one."""
    for tied, source in plan.TIED.items():
        copies = pieces.pop(tied, None)
        if copies is None:
            continue
        same = all(torch.equal(a, b) for a, b in zip(copies, pieces[source], strict=True))
        for piece in (*copies, *pieces[source]):  # read whole for the comparison: released
            drop_file_pages(piece)
        if not same:
            raise TpshardError(
                f"{shards.directory}: the last stage's {tied} differs from stage 0's {source}, which the manifest "
                "records as tied: the set was modified; re-split it"
            )
    return pieces


def reshard(
    shards: ShardSet,
    tp_size: int,
    out_dir: Path,
    *,
    pp: int = 1,
    stage_layers: Stages | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """One grid to another (tp x pp) directly: each tensor is reassembled from the old pieces and cut
    for the new ranks, one tensor at a time, without a dense checkpoint on disk. The rank files are
    byte-identical to a direct split's. The old rank files' sha256 are checked while the new ones are
    written (RankFileChecks), before out_dir takes its name. progress: the bytes written and hashed."""
    grid = ParallelDims(tp_size, pp)
    grid.check(shards.manifest.config)
    stages = choose_stages(shards.manifest.config, pp, stage_layers, tp_size, shards.manifest.vocab_parallel)
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
    m = shards.manifest
    checks = RankFileChecks(shards, progress=progress)
    with checks.confirm_on_error():
        old = _untied(shards, mapped_pieces(shards))
    tensors = tensor_table(m.config, m.vocab_parallel, pp)
    manifest = Manifest(grid, m.config, m.dtype, tensors, [], {}, vocab_parallel=m.vocab_parallel, stages=stages)

    def piece(name: str, rank: int) -> torch.Tensor:
        pieces = old[plan.TIED.get(name, name)]
        cut, read = _recut(name, pieces, grid.coordinates(rank)[1], tp_size, m.vocab_parallel, m.config.vocab_size)
        if not any(shares_memory(cut, p) for p in read):
            for p in read:  # copied out: their pages are done with (a view's are dropped once written)
                drop_file_pages(p)
        return cut

    resharded_from = {"resharded_from_tp": m.tp_size} | ({"resharded_from_pp": m.grid.pp} if m.grid.pp > 1 else {})
    return write_shard_set(
        out_dir,
        manifest,
        piece,
        lambda: {**m.source, **resharded_from},
        force=force,
        tokenizer_file=tokenizer,
        tokenizer_name=tokenizer_name,
        progress=progress,
        before_rename=checks.confirm,
    )


def _recut(
    name: str, pieces: list[torch.Tensor], tp_rank: int, tp_size: int, vocab_parallel: bool, vocab_size: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """plan.shard(name, plan.unshard(name, pieces), tp_rank, tp_size), the new rank's piece, cut from
    the old pieces it overlaps without putting the dense tensor together (a view of one old piece
    where it lies inside it; a q, k, v piece as (3, rows, ...), its elements in order), and those old
    pieces. The same values, so the same bytes on disk."""
    rule = plan.rule_for(name, vocab_parallel)
    if rule is plan.Rule.REPLICATED:
        return pieces[0], pieces[:1]
    if rule is plan.Rule.QKV_COLUMN:  # q, k and v each: the same run of rows across the old ranks' parts
        parts = [piece.view(3, -1, *piece.shape[1:]) for piece in pieces]
        rows = parts[0].size(1) * len(parts) // tp_size
        cut, used = _span(parts, 1, tp_rank * rows, (tp_rank + 1) * rows)
        return cut, [pieces[i] for i in used]
    dim = 0 if rule is plan.Rule.VOCAB else rule.dim
    assert dim is not None
    total = sum(piece.size(dim) for piece in pieces) if rule is not plan.Rule.VOCAB else vocab_size
    size = plan.vocab_slice(total, tp_size) if rule is plan.Rule.VOCAB else total // tp_size
    start, stop = tp_rank * size, min((tp_rank + 1) * size, total)  # the vocabulary's padding rows: zeros
    cut, used = _span(pieces, dim, start, stop)
    if stop - start < size:
        cut = torch.cat([cut, cut.new_zeros(size - (stop - start), *cut.shape[1:])])
    return cut, [pieces[i] for i in used]


def _span(pieces: list[torch.Tensor], dim: int, start: int, stop: int) -> tuple[torch.Tensor, list[int]]:
    """Elements start..stop along dim of the pieces laid end to end, and which pieces they come from:
    a view when they lie in one piece, else those pieces' parts put together."""
    parts, used, offset = [], [], 0
    for i, piece in enumerate(pieces):
        length = piece.size(dim)
        first, last = max(start, offset), min(stop, offset + length)
        if first < last:
            parts.append(piece.narrow(dim, first - offset, last - first))
            used.append(i)
        offset += length
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)), used
