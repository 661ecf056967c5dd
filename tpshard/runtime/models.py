"""The same GPT, built for the ranks a process hosts, with counted collectives:

    dense        the whole model, one rank (from a checkpoint, or a shard set merged in memory)
    simulated    every rank of a shard set in one process, every stage; a reduction is a sum over
                 local ranks, a stage's output is handed to the next stage in memory
    distributed  one rank per process; the sum goes across the stage's tensor-parallel group, the
                 stage's output to the next stage's process
"""

from typing import TYPE_CHECKING

import torch

from tpshard.comm.collectives import Collectives
from tpshard.comm.counting import CountingCollectives
from tpshard.convert import merge_shards
from tpshard.files.checkpoint import Checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.parallel import plan
from tpshard.parallel.grid import Placement
from tpshard.parallel.layers import VocabParallelHead

if TYPE_CHECKING:
    from tpshard.runtime.launch import Group


def sharded_model(
    shards: ShardSet,
    ranks: list[int],
    comm: Collectives,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    checksum: bool = True,
    sequence_parallel: bool = False,
) -> GPT:
    """A GPT holding the given (global) ranks' slices, read from their files only (simulated: all
    ranks). checksum: check each file's sha256 first (False: the caller just did).
    sequence_parallel: forwards of more than one token run that schedule (parallel/sequence.py)."""
    m = shards.manifest
    where = [m.grid.coordinates(r) for r in ranks]
    tp_ranks, hosted = tuple(sorted({t for _, t in where})), tuple(sorted({s for s, _ in where}))
    if len(where) != len(tp_ranks) * len(hosted):
        raise ValueError(f"ranks {ranks}: not the same tensor-parallel ranks of each stage")
    placement = Placement(m.tp_size, tp_ranks, m.vocab_parallel, m.stages if m.grid.pp > 1 else None, hosted)
    pieces = shards.load_pieces(list(ranks), checksum=checksum)
    state = plan.local_state_dict(pieces, placement.vocab_parallel)
    model = GPT.from_state_dict(shards.manifest.config, state, placement, comm)
    model.sequence_parallel = sequence_parallel
    return model.to(device=device, dtype=dtype)


def dense_model(
    source: Checkpoint | ShardSet,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    checksum: bool = True,
) -> GPT:
    """The whole model: a checkpoint as is, or a shard set merged in memory (checksums verified
    unless checksum=False)."""
    checkpoint = source if isinstance(source, Checkpoint) else merge_shards(source, checksum=checksum)
    return GPT.from_state_dict(checkpoint.config, checkpoint.state_dict).to(device=device, dtype=dtype)


def simulated_model(
    shards: ShardSet,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    checksum: bool = True,
    sequence_parallel: bool = False,
) -> GPT:
    """Every rank in this process; a reduction sums the local ranks' partials, and each stage hands
    its output to the next in memory."""
    ranks = list(range(shards.manifest.grid.world_size))
    comm = CountingCollectives(Collectives())  # its own: the stage hand-over passes through it
    options = {"checksum": checksum, "sequence_parallel": sequence_parallel}
    return sharded_model(shards, ranks, comm, device=device, dtype=dtype, **options)


def distributed_model(
    shards: ShardSet,
    group: "Group",
    *,
    dtype: torch.dtype | None = None,
    checksum: bool = True,
    sequence_parallel: bool = False,
) -> GPT:
    """This process's rank only, read from its own file; the collectives go through the group. The
    logits are vocabulary-parallel, from the split itself (split --vocab-parallel) or else from
    VocabParallelHead."""
    comm = CountingCollectives(group.comm)
    options = {"checksum": checksum, "sequence_parallel": sequence_parallel}
    model = sharded_model(shards, [group.rank], comm, device=group.device, dtype=dtype, **options)
    if model.last and not shards.manifest.vocab_parallel:
        model.lm_head = VocabParallelHead(model.lm_head.weight, group.tp_rank, group.grid.tp, group.comm)
    group.barrier()  # every rank loaded (and checksummed) its shard before the first step's timeout starts
    return model
