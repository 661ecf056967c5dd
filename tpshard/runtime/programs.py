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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from tpshard.comm.counting import CountingCollectives
from tpshard.errors import TpshardError
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling, Stats, TokenPicker, generate
from tpshard.model import GPT
from tpshard.runtime import launch
from tpshard.runtime.launch import Group
from tpshard.runtime.models import distributed_model, simulated_model

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


@dataclass
class RankUsage:
    """One rank's resources, gathered for --stats."""

    peak_rss: int
    shard_bytes: int
    comm_seconds: float


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
    weight = model.lm_head.weight
    if speaks:
        sink.started(label, weight.device, weight.dtype)
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
        bad = ~torch.isfinite(param)
        if bad.any():
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


def generate_on_rank(group: Group, shards: ShardSet, request: Request, sink: GenerationSink) -> None:
    """One rank of a distributed generate: its own shard only; rank 0 tells the sink."""
    model = distributed_model(shards, group, dtype=request.dtype)
    backend = "NCCL" if group.device.type == "cuda" else "gloo"
    label = f"distributed tp {group.world_size} ({group.world_size} processes, {backend})"
    stats = generate_samples(model, request, label, sink)
    if request.show_stats:  # every rank takes part in the gather
        mine = RankUsage(peak_rss_bytes(), shards.manifest.files[group.rank]["bytes"], stats.comm_seconds)
        ranks = group.gather_to_rank0(mine)
        if group.rank == 0:
            sink.report(stats, request, ranks)


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
    forwards: list[tuple[int, int, int]]  # per forward: reductions, bytes reduced, tokens in


@torch.inference_mode()
def trace(model: GPT, idx: torch.Tensor, context: int, new_tokens: int) -> Trace:
    """Run idx (B, T) through model: one full forward with every hidden state, then greedy decoding
    of new_tokens after the first `context` tokens (every rank takes rank 0's token)."""
    forwards: list[tuple[int, int, int]] = []
    counter = model.comm if isinstance(model.comm, CountingCollectives) else CountingCollectives(model.comm)
    before = model.register_forward_pre_hook(lambda _, args: forwards.append((counter.calls, counter.bytes, 0)))

    def after(_module: GPT, args: tuple, _output: torch.Tensor) -> None:
        calls, sent, _ = forwards[-1]
        forwards[-1] = (counter.calls - calls, counter.bytes - sent, args[0].numel())

    hooks = [before, model.register_forward_hook(after)]
    try:
        hidden: list[torch.Tensor] = []
        logits = model(idx, hidden_states=hidden)
        tokens, top2 = _greedy(model, idx[:, :context], new_tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return Trace(hidden, logits, tokens, top2, forwards)


def _greedy(model: GPT, idx: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    picker = TokenPicker(Sampling(greedy=True))
    top2: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top2.append(logits.float().topk(min(2, logits.size(-1))).values)
        return model.comm.broadcast_token(picker(logits))

    tokens = list(generate(model, idx, new_tokens, pick))
    B = idx.size(0)
    if not tokens:
        return torch.empty(B, 0, dtype=torch.long), torch.empty(B, 0, 2)
    return torch.stack(tokens, 1), torch.stack(top2, 1)


def sharded_traces(
    shards: ShardSet, batches: list[torch.Tensor], contexts: list[int], new_tokens: int, mode: str
) -> list[Trace]:
    """The sharded model's traces of every batch: all ranks in this process (simulated), or one
    process per rank (distributed; rank 0's traces, identical on every rank, come back). The rank
    files' sha256 are not checked again: verify's integrity part has just done it."""
    if mode == "simulated":
        model = simulated_model(shards, checksum=False)
        return [trace(model, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)]
    if launch.started_by_torchrun():
        raise TpshardError("verify --mode distributed starts its own ranks; run it without torchrun")
    with tempfile.TemporaryDirectory(prefix="tpshard-verify-") as tmp:
        out = Path(tmp, "traces.pt")
        args = (shards, batches, contexts, new_tokens, str(out))
        launch.run(traces_on_rank, args, nproc=shards.tp_size, device="cpu")
        saved = torch.load(out, weights_only=True)
    return [Trace(**t) for t in saved]


def traces_on_rank(
    group: Group, shards: ShardSet, batches: list[torch.Tensor], contexts: list[int], new_tokens: int, out: str
) -> None:
    """One rank of a distributed verify: its own shard file only; rank 0 saves the traces."""
    model = distributed_model(shards, group, checksum=False)
    traces = [trace(model, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)]
    if group.rank == 0:
        torch.save([vars(t) for t in traces], out)


