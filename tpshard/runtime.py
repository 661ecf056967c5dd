"""Runtimes: the same GPT, built for the ranks a process hosts, with an instrumented reduction.

dense        the whole model, one rank (from a checkpoint, or a shard set merged in memory)
simulated    every rank of a shard set in one process; the reduction is a sum over local ranks
distributed  one rank per process; the sum is followed by a collective over the process group
"""

import time
from collections.abc import Callable

import torch

from tpshard import plan
from tpshard.model import GPT, Gather, Placement, local_logits
from tpshard.shards import ShardSet


class CountingReduce:
    """The reduction at a block's two sync points: sum the local ranks' partials, then combine across
    processes when there is a group. Counts what it does, so reports show measured, not theoretical,
    communication."""

    def __init__(self, across: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.across = across
        self.calls = 0
        self.bytes = 0  # bytes of the reduced activations (what an all-reduce carries per rank)
        self.seconds = 0.0  # time spent in the cross-process collective

    def __call__(self, partials: torch.Tensor) -> torch.Tensor:
        out = partials.sum(0)
        self.calls += 1
        self.bytes += out.numel() * out.element_size()
        if self.across is not None:
            start = time.perf_counter()
            out = self.across(out)
            self.seconds += time.perf_counter() - start
        return out

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


def sharded_model(
    shards: ShardSet,
    ranks: list[int],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    gather: Gather = local_logits,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> GPT:
    """A GPT holding the given ranks' slices, read from their files only (simulated: all ranks).
    gather: how a vocab-parallel set's logits are collected from the other processes."""
    placement = Placement(shards.tp_size, tuple(ranks), shards.manifest.vocab_parallel)
    pieces = shards.load_pieces(list(ranks))
    state = plan.load_local_ranks(shards.manifest.config, placement, pieces)
    model = GPT.from_state_dict(shards.manifest.config, state, placement, reduce or CountingReduce(), gather)
    return model.to(device=device, dtype=dtype)
