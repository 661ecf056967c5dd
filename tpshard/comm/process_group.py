"""The collectives over a torch.distributed process group: gloo on CPU, NCCL on CUDA.

reduce_partials is an all-gather of every rank's partial sum followed by a sum in rank order
(rank_order_sum), not an all_reduce: every rank adds the same partials in the same order, so the
result is bit-identical on every rank, which keeps their residual streams, KV caches and logits
identical (and on CPU it is the faster of the two: benchmarks/bench_inference.py measures both).

On CPU a rank with a core of its own polls its collective, yielding the core to gloo's threads: a
rank that blocks idles its virtual CPU, and waking it again takes milliseconds now and then. With
NCCL the collective is waited for on the stream, as usual.
"""

import os
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from tpshard.comm.collectives import NETWORK_PIECE_ROWS, Collectives, Piece, rank_order_sum
from tpshard.errors import TpshardError, first_line

# One collective during generation, where every rank does the same work: a peer silent this long is
# stuck (a dead one is noticed at once, its sockets close).
STEP_TIMEOUT = timedelta(seconds=10)
# torch 2.13 renamed all_gather_into_tensor; the old name remains for older releases
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class LostPeer(TpshardError):
    """A collective failed: a consequence of another rank's failure, not the cause."""


def lost_peer(e: Exception) -> LostPeer:
    return LostPeer(f"lost contact with the other ranks ({first_line(e, 160) or type(e).__name__})")


class ProcessGroupCollectives(Collectives):
    piece_rows = NETWORK_PIECE_ROWS

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device, poll: bool):
        """group: the tensor-parallel ranks, with STEP_TIMEOUT. poll: wait by polling (CPU, when every
        rank has a core of its own)."""
        self.group, self.rank, self.world_size, self.device, self.poll = group, rank, world_size, device, poll
        self.seconds, self.received_bytes = 0.0, 0
        # global ranks, by group rank: what broadcast's src and gather's dst name (torch < 2.6 has no group_src)
        self.members = dist.get_process_group_ranks(group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, stacked in rank order: [world_size, *x.shape], the same on every rank."""
        parts = x.new_empty((self.world_size, *x.shape))
        self._wait(lambda: _all_gather_single(parts.view(-1), x.contiguous().view(-1), group=self.group, async_op=True))
        return parts

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return rank_order_sum(self.all_gather(rank_order_sum(partials)))

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.all_gather(local).unbind(0), dim=-1)

    def gather_piece(self, rows: torch.Tensor | None, piece: Piece, like: torch.Tensor) -> torch.Tensor:
        """A broadcast from the piece's owner."""
        assert rows is None or rows.dtype == like.dtype, "a piece in the dtype of the activations"
        mine = piece.owner == self.rank
        buf = rows.contiguous() if mine else like.new_empty((like.size(0), piece.rows, *like.shape[2:]))
        self._wait(lambda: dist.broadcast(buf, src=self.members[piece.owner], group=self.group, async_op=True))
        self.received_bytes += 0 if mine else buf.nbytes
        return buf

    def reduce_piece(self, partials: torch.Tensor, piece: Piece, out: torch.Tensor | None) -> None:
        """A gather of every rank's partial to the owner, which sums them in rank order: the values
        reduce_partials gives, bit for bit (a reduce sums in its algorithm's order)."""
        mine = rank_order_sum(partials).contiguous()
        parts = mine.new_empty((self.world_size, *mine.shape)) if out is not None else None
        listed = list(parts.unbind(0)) if parts is not None else None
        self._wait(lambda: dist.gather(mine, listed, dst=self.members[piece.owner], group=self.group, async_op=True))
        if parts is not None:
            rank_order_sum(parts, out=out)
            self.received_bytes += (self.world_size - 1) * mine.nbytes

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        self._wait(lambda: dist.broadcast(token, src=0, group=self.group, async_op=True))
        return token

    def _wait(self, start: Callable[[], dist.Work]) -> None:
        self.seconds += complete(start, self.device, self.poll)


def complete(start: Callable[[], dist.Work], device: torch.device, poll: bool) -> float:
    """Run a collective (or a send, a receive) to completion and return the seconds it took: a
    failure, or on CPU no answer within STEP_TIMEOUT, becomes LostPeer."""
    begin = time.perf_counter()
    try:
        work = start()
        if device.type == "cuda":
            work.wait()  # ordered on the stream; NCCL's watchdog enforces the group's timeout
        elif poll:
            deadline = time.monotonic() + STEP_TIMEOUT.total_seconds()
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise LostPeer(f"no answer from the other ranks in {STEP_TIMEOUT.seconds} s: one is stuck")
                os.sched_yield()
            work.wait()
        else:
            work.wait(STEP_TIMEOUT)
    except RuntimeError as e:
        raise lost_peer(e) from None
    return time.perf_counter() - begin
