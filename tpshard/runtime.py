"""Runtimes: the same GPT, built for the ranks a process hosts, with an instrumented reduction.

dense        the whole model, one rank (from a checkpoint, or a shard set merged in memory)
simulated    every rank of a shard set in one process; the reduction is a sum over local ranks
distributed  one rank per process; the sum is followed by a collective over the process group

And generation over any of them, timed, with the communication it actually did counted.
"""

import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from tpshard import hf, plan
from tpshard.checkpoint import Checkpoint, load_checkpoint
from tpshard.generate import Sampling, TokenPicker, generate
from tpshard.model import GPT, Gather, Placement, local_logits
from tpshard.shards import ShardSet, merge_shards

if TYPE_CHECKING:
    from tpshard.launch import Group


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
    checksum: bool = True,
) -> GPT:
    """A GPT holding the given ranks' slices, read from their files only (simulated: all ranks).
    gather: how a vocab-parallel set's logits are collected from the other processes.
    checksum: check each file's sha256 first (False: the caller just did)."""
    placement = Placement(shards.tp_size, tuple(ranks), shards.manifest.vocab_parallel)
    pieces = shards.load_pieces(list(ranks), checksum=checksum)
    state = plan.load_local_ranks(shards.manifest.config, placement, pieces)
    model = GPT.from_state_dict(shards.manifest.config, state, placement, reduce or CountingReduce(), gather)
    return model.to(device=device, dtype=dtype)


def open_source(path: str | Path) -> Checkpoint | ShardSet:
    """A shard directory (the output of split), or a dense checkpoint: a ckpt.pt, a dense
    .safetensors, a Hugging Face GPT-2 directory."""
    path = Path(path)
    if path.is_dir() and not hf.is_hf_directory(path):
        return ShardSet.open(path)
    return load_checkpoint(path)


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
    return checkpoint.model(device, dtype)


def simulated_model(
    shards: ShardSet,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    checksum: bool = True,
) -> GPT:
    """Every rank in this process; the reduction sums the local ranks' partials."""
    ranks = list(range(shards.tp_size))
    return sharded_model(shards, ranks, CountingReduce(), device=device, dtype=dtype, checksum=checksum)


def distributed_model(
    shards: ShardSet, group: "Group", *, dtype: torch.dtype | None = None, checksum: bool = True
) -> GPT:
    """This process's rank only, read from its own file. The reduction
    adds the other ranks' partials through group.sum_across; the logits are vocabulary-parallel, from
    the split itself (split --vocab-parallel) or else from VocabParallelHead."""

    def gather(logits: torch.Tensor) -> torch.Tensor:  # [B, T, slice] -> [B, T, ranks * slice], rank order
        return torch.cat(group.all_gather(logits).unbind(0), dim=-1)

    reduce = CountingReduce(across=group.sum_across)
    model = sharded_model(
        shards, [group.rank], reduce, gather=gather, device=group.device, dtype=dtype, checksum=checksum
    )
    if not shards.manifest.vocab_parallel:
        model.lm_head = VocabParallelHead(model.lm_head.weight, group.rank, group.world_size, gather)
    group.barrier()  # every rank loaded (and checksummed) its shard before the first step's timeout starts
    return model


class VocabParallelHead(nn.Module):
    """The output layer split by vocabulary rows (Megatron's parallel output layer) for a shard set
    whose embedding is replicated: each rank multiplies by its share of the rows of the tied embedding
    (a view, nothing copied) and the shares are gathered, so every rank returns the full logits.
    Replicated, every rank would stream the whole V x C matrix for every token, the largest of GPT-2
    (31% of its weights); decoding on CPU is bound by that memory traffic (GPT-2 124M, tp 2: 22
    tokens/s with a replicated head, 27-30 with this one, 25 dense)."""

    def __init__(self, weight: nn.Parameter, rank: int, world_size: int, gather: Gather):
        super().__init__()
        self.weight = weight  # the whole tied embedding: the KV cache and callers read its dtype and device
        self.rank, self.gather = rank, gather
        self.rows = plan.vocab_slice(weight.size(0), world_size)  # padded up: the last rank's share may be shorter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mine = F.linear(x, self.weight[self.rank * self.rows : (self.rank + 1) * self.rows])
        mine = F.pad(mine, (0, self.rows - mine.size(-1)))
        return self.gather(mine)[..., : self.weight.size(0)]


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far. On Linux the high-water mark of its own memory
    (VmHWM): ru_maxrss survives fork and exec there, so a worker spawned by a larger parent would
    report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


@dataclass
class Stats:
    """What a run did, measured."""

    samples: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # prompt forward + first token, summed over samples
    decode_seconds: float = 0.0  # every later token
    forwards: int = 0
    sync_points: int = 0  # reductions done (CountingReduce calls); 0 for a dense model
    sync_bytes: int = 0  # bytes those reductions produced, per rank
    comm_seconds: float = 0.0  # in collectives (waiting for the slowest rank included)

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / seconds if seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - self.samples) / self.decode_seconds if self.decode_seconds else 0.0


class Runner:
    """Generation with one model, for any runtime: timed, its communication counted.

    Distributed (group given), rank 0 alone picks each token (its picker holds the only RNG stream)
    and broadcasts it, so every rank feeds the same token to its next step. Every rank's logits are
    bit-identical anyway (gathered, see launch.Group.sum_across), so each could draw from a generator
    of its own; the broadcast makes that a guarantee instead of a property of the kernels and the
    hardware, for one 8-byte collective per token against 2 * n_layer reductions.
    """

    def __init__(self, model: GPT, sampling: Sampling, group: "Group | None" = None):
        self.model = model
        self.group = group
        self.device = model.lm_head.weight.device
        self.picker = TokenPicker(sampling, self.device) if group is None or group.rank == 0 else None
        self._stats = Stats()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.picker is not None:
            token = self.picker(logits)
        else:
            token = torch.empty(logits.size(0), dtype=torch.long, device=self.device)
        return token if self.group is None else self.group.broadcast(token)

    def sample(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        """Yield max_new_tokens token ids continuing prompt (batch 1)."""
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        self._stats.samples += 1
        tokens = generate(self.model, idx, max_new_tokens, self._pick)
        start = time.perf_counter()
        for i, token in enumerate(tokens):
            value = int(token[0])  # waits for the device, so the time below is real
            elapsed = time.perf_counter() - start
            if i == 0:
                self._stats.prefill_seconds += elapsed
            else:
                self._stats.decode_seconds += elapsed
            self._stats.new_tokens += 1
            self._stats.forwards += 1  # each token took one: the prompt's, a step's, or a cropped window's
            yield value
            start = time.perf_counter()  # the consumer's time (printing) is not the model's

    def stats(self) -> Stats:
        reduce = self.model.reduce
        counted = reduce if isinstance(reduce, CountingReduce) else CountingReduce()  # dense: none
        comm = self.group.seconds if self.group else 0.0  # reductions, logits, tokens: all its collectives
        return replace(self._stats, sync_points=counted.calls, sync_bytes=counted.bytes, comm_seconds=comm)
