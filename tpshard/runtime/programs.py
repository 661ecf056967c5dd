"""What a run does, for any runtime: generate's token loop and verify's traces, each with its
per-rank entry point for distributed runs (launch.run calls them in every rank's process).

Nothing here prints: generation reports to a sink the caller gives (the CLI's renders to the
terminal), which for a distributed run is pickled to the ranks and used by rank 0 alone.
"""

import resource
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from tpshard.comm.counting import COUNTS, CountingCollectives
from tpshard.errors import TpshardError
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling, Stats, TokenPicker, generate
from tpshard.model import GPT
from tpshard.parallel.grid import ParallelDims
from tpshard.runtime import launch, streamed
from tpshard.runtime.launch import Group
from tpshard.runtime.models import distributed_model

# --- generate ---------------------------------------------------------------------------------------


@dataclass
class Request:
    """What every rank needs to generate; pickled to the worker processes of a distributed run."""

    prompt: list[int]
    sampling: Sampling
    max_new_tokens: int
    num_samples: int
    dtype: torch.dtype | None
    show_stats: bool
    sequence_parallel: bool = False


@dataclass
class RankUsage:
    """One rank's resources and communication, gathered for --stats."""

    peak_rss: int
    shard_bytes: int
    comm_seconds: float
    stage: int = 0
    sync_points: int = 0  # reductions in its stage's tensor-parallel group
    sends: int = 0  # to the next stage
    p2p_seconds: float = 0.0
    scatters: int = 0  # sequence-parallel reduce-scatters and all-gathers in its stage's group
    gathers: int = 0
    received_bytes: int = 0  # of their pieces, from the other ranks


class GenerationSink(Protocol):
    """Where a generation's text and figures go (rank 0 only)."""

    def started(self, label: str, device: torch.device, dtype: torch.dtype) -> None: ...

    def sample(self, prompt: list[int], tokens: Iterator[int]) -> None:
        """Consume tokens (a sample is generated as they are taken)."""

    def finished(self, stats: Stats) -> None: ...

    def report(self, stats: Stats, request: Request, ranks: list[RankUsage] | None) -> None:
        """--stats; ranks: every rank's usage in a distributed run."""


def generate_samples(model: GPT, request: Request, label: str, sink: GenerationSink) -> Stats:
    """request.num_samples samples, one after another from one RNG stream. Every rank of a
    distributed run calls it in lockstep; rank 0 alone tells the sink."""
    speaks = model.comm.rank == 0
    check_finite(model, request.dtype)
    runner = Runner(model, request.sampling)
    if speaks:
        sink.started(label, model.device, model.dtype)
    for _ in range(request.num_samples):
        tokens = runner.sample(request.prompt, request.max_new_tokens)
        if speaks:
            sink.sample(request.prompt, tokens)
        else:
            deque(tokens, maxlen=0)  # run the steps in lockstep with rank 0, tell nothing
    stats = runner.stats()
    if speaks:
        sink.finished(stats)
    return stats


def check_finite(model: GPT, cast: torch.dtype | None = None) -> None:
    """Refuse a model whose weights hold NaN or inf (a diverged run, a damaged file, or a cast to a
    dtype too narrow for them): it would print garbage, or crash in the middle of sampling. Names
    the first such tensor. cast: the dtype the weights were cast to, if any."""
    for name, param in model.named_parameters():
        if not param.numel():
            continue
        # min and max are NaN or infinite when any value is: a reduction, where isfinite() would allocate
        # a mask as large as the tensor (for GPT-2's output layer, 150 MiB more peak memory per rank)
        low, high = torch.aminmax(param.detach())
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad = ~torch.isfinite(param)  # the error path only: count what is wrong
            nan = int(torch.isnan(param).sum())
            what = ", ".join(
                f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (int(bad.sum()) - nan, "infinite")) if n
            )
            dtype = str(param.dtype).removeprefix("torch.")
            if cast is None or nan:  # a cast makes inf of what it cannot hold, never NaN
                why = "the model cannot generate: a diverged training run, or a damaged file?"
            else:
                why = f"the model cannot generate: is --dtype {dtype} too narrow for its weights?"
            raise TpshardError(f"{name}: {what} of its {param.numel():,} values in {dtype}; {why}")


def grid_label(grid: ParallelDims, sequence_parallel: bool = False) -> str:
    label = f"tp {grid.tp} x pp {grid.pp}" if grid.pp > 1 else f"tp {grid.tp}"
    return label + (", sequence-parallel" if sequence_parallel else "")


def generate_on_rank(group: Group, shards: ShardSet, request: Request, sink: GenerationSink) -> None:
    """One rank of a distributed generate: its own shard only; rank 0 tells the sink."""
    model = distributed_model(shards, group, dtype=request.dtype, sequence_parallel=request.sequence_parallel)
    label = f"distributed {grid_label(group.grid, request.sequence_parallel)} ({group.world_size} processes, "
    label += f"{_comm_label(group)})"
    stats = generate_samples(model, request, label, sink)
    if request.show_stats:  # every rank takes part in the gather
        shard, s = shards.manifest.files[group.rank]["bytes"], stats
        counts = (s.sync_points, s.sends, s.p2p_seconds, s.scatters, s.gathers, s.received_bytes)
        mine = RankUsage(peak_rss_bytes(), shard, s.comm_seconds, group.stage, *counts)
        ranks = group.gather_to_rank0(mine)
        if group.rank == 0:
            sink.report(stats, request, ranks)


def _comm_label(group: Group) -> str:
    """What runs the collectives: shm or gloo or NCCL inside a stage, and gloo or NCCL between stages."""
    inside = "NCCL" if group.comm_name == "nccl" else group.comm_name
    between = "NCCL" if group.device.type == "cuda" else "gloo"
    if group.grid.pp == 1 or inside == between:
        return inside
    return f"{inside} inside a stage, {between} between stages"


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


# --- verify -----------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What one model computed on one batch: either side of verify's comparison, from any runtime."""

    hidden: list[torch.Tensor]  # the residual stream after the embedding and after each block [B, T, C]
    logits: torch.Tensor  # [B, T, V]
    tokens: torch.Tensor  # [B, K] greedy continuation of the context, through the KV cache
    top2: torch.Tensor  # [B, K, 2] the two largest logits each greedy token was picked from
    # per forward, what comm counted (comm/counting.py's COUNTS, summed over the stages; per
    # tensor-parallel rank, but received_bytes: summed over a stage's ranks), its input's batch and length,
    # whether it ran the sequence-parallel schedule (1) or the tensor-parallel one (0), and whether it
    # gave the logits of the last position only (1)
    forwards: list[dict[str, int]]
    # the full forward's (reductions, reduce-scatters, all-gathers), stage by stage
    stage_collectives: list[tuple[int, int, int]] = field(default_factory=list)


@torch.inference_mode()
def trace(model: GPT, idx: torch.Tensor, context: int, new_tokens: int) -> Trace:
    """Run idx (B, T) through model: one full forward with every hidden state, then greedy decoding
    of new_tokens after the first `context` tokens (every rank takes rank 0's token). Sequence-parallel,
    the hidden states are this process's chunks of the sequence (join_chunks puts them together)."""
    forwards: list[dict[str, int]] = []
    counter = model.comm if isinstance(model.comm, CountingCollectives) else CountingCollectives(model.comm)

    def after(_module: GPT, args: tuple, kwargs: dict, _output: torch.Tensor) -> None:
        begin, now = forwards[-1], counter.snapshot()
        B, T = args[0].shape
        chunked, last_only = int(model.sequence_split(T) is not None), int(kwargs.get("last_only", False))
        shape = {"batch": B, "length": T, "sequence_parallel": chunked, "last_only": last_only}
        forwards[-1] = {k: now[k] - begin[k] for k in COUNTS} | shape

    before = model.register_forward_pre_hook(lambda *_: forwards.append(counter.snapshot()))
    hooks = [before, model.register_forward_hook(after, with_kwargs=True)]
    try:
        hidden: list[torch.Tensor] = []
        start, sends = counter.collectives, len(counter.at_sends)
        logits = model(idx, hidden_states=hidden)
        # what was counted at the end of each stage here: at its send, or, the last stage, at the end
        ends = [*counter.at_sends[sends:], *([counter.collectives] if model.last else [])]
        bounds = zip([start, *ends], ends, strict=False)
        stage_collectives = [tuple(b - a for a, b in zip(begin, end, strict=True)) for begin, end in bounds]
        tokens, top2 = _greedy(model, idx[:, :context], new_tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return Trace(hidden, logits, tokens, top2, forwards, stage_collectives)


def _greedy(model: GPT, idx: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    picker = TokenPicker(Sampling(greedy=True))
    top2: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top2.append(logits.float().topk(min(2, logits.size(-1))).values)  # [B, 0] on a stage without logits
        mine = picker(logits) if model.comm.picks_tokens else torch.empty(logits.size(0), dtype=torch.long)
        return model.comm.broadcast_token(mine)

    tokens = list(generate(model, idx, new_tokens, pick))
    B = idx.size(0)
    if not tokens:
        return torch.empty(B, 0, dtype=torch.long), torch.empty(B, 0, 2)
    return torch.stack(tokens, 1), torch.stack(top2, 1)


def sharded_traces(
    shards: ShardSet,
    batches: list[torch.Tensor],
    contexts: list[int],
    new_tokens: int,
    mode: str,
    comm: str = "auto",
    sequence_parallel: bool = False,
) -> tuple[list[Trace], str]:
    """The sharded model's traces of every batch: all ranks in this process (simulated: one block's
    weights at a time, runtime/streamed.py), or one process per rank (distributed, each rank holding
    its own shard; rank 0's traces, identical on every rank, come back). The rank files' sha256 are
    not checked again: verify's integrity part has just done it. Also returns what carried the
    collectives (comm: auto, shm or gloo, for distributed)."""
    if mode == "simulated":
        model = streamed.simulated_model(shards, sequence_parallel)
        return [trace(model, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)], "in memory"
    if launch.started_by_torchrun():
        raise TpshardError("verify --mode distributed starts its own ranks; run it without torchrun")
    with tempfile.TemporaryDirectory(prefix="tpshard-verify-") as tmp:
        out = Path(tmp, "traces.pt")
        args = (shards, batches, contexts, new_tokens, str(out), sequence_parallel)
        grid = shards.manifest.grid
        launch.run(traces_on_rank, args, nproc=grid.world_size, device="cpu", grid=grid, comm=comm)
        saved = torch.load(out, weights_only=True)
    return [Trace(**t) for t in saved["traces"]], saved["comm"]


def traces_on_rank(
    group: Group,
    shards: ShardSet,
    batches: list[torch.Tensor],
    contexts: list[int],
    new_tokens: int,
    out: str,
    sequence_parallel: bool = False,
) -> None:
    """One rank of a distributed verify: its own shard file only; rank 0 saves the traces (with
    stages, put together from tp rank 0 of each stage's; sequence-parallel, from every rank's chunks)."""
    model = distributed_model(shards, group, checksum=False, sequence_parallel=sequence_parallel)
    traces = [trace(model, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)]
    grid = group.grid
    chunked = [bool(t.forwards[0]["sequence_parallel"]) for t in traces]
    if grid.pp > 1 or any(chunked):
        gathered = group.gather_to_rank0(traces if any(chunked) or group.tp_rank == 0 else None)
        if gathered is None:
            return
        stages = [[gathered[grid.rank(s, t)] for t in range(grid.tp if any(chunked) else 1)] for s in range(grid.pp)]
        traces = [_join_stages([_stage_trace(stage, i, chunked[i]) for stage in stages]) for i in range(len(batches))]
    if group.rank == 0:
        torch.save({"traces": [vars(t) for t in traces], "comm": _comm_label(group)}, out)


def _stage_trace(ranks: list[list[Trace]], batch: int, chunked: bool) -> Trace:
    """One stage's trace of a batch, from its tensor-parallel ranks' traces of every batch."""
    return join_chunks([traces[batch] for traces in ranks]) if chunked else ranks[0][batch]


def join_chunks(ranks: list[Trace]) -> Trace:
    """One trace from a stage's tensor-parallel ranks' sequence-parallel ones: each hidden state's
    chunks put together in rank order, the bytes each rank received summed (the rest is the same on
    every rank: tp rank 0's)."""
    hidden = [torch.cat(chunks, dim=1) for chunks in zip(*(t.hidden for t in ranks), strict=True)]
    forwards = [
        f | {"received_bytes": sum(g["received_bytes"] for g in per_rank)}
        for f, per_rank in zip(ranks[0].forwards, zip(*(t.forwards for t in ranks), strict=True), strict=True)
    ]
    return replace(ranks[0], hidden=hidden, forwards=forwards)


def _join_stages(stages: list[Trace]) -> Trace:
    """One trace from each stage's, in stage order: the hidden states of every stage, the last
    stage's logits, and the counts summed over the stages."""
    if len(stages) == 1:
        return stages[0]
    last = stages[-1]
    forwards = []
    for i, per_stage in enumerate(zip(*(s.forwards for s in stages), strict=True)):
        summed = {k: sum(f[k] for f in per_stage) for k in COUNTS}
        shape = ("batch", "length", "sequence_parallel", "last_only")
        forwards.append(summed | {k: last.forwards[i][k] for k in shape})
    hidden = [h for s in stages for h in s.hidden]
    per_stage_counts = [n for s in stages for n in s.stage_collectives]
    return Trace(hidden, last.logits, last.tokens, last.top2, forwards, per_stage_counts)
