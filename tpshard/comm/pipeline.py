"""A rank's collectives in a pipelined run (more than one stage): the tensor-parallel patterns inside
its stage's group, the hand-over between stages and the token broadcast across the whole run.

    send_forward   x [B, T, C] to (stage + 1, same tp rank)        point-to-point over torch.distributed
    recv_forward   x [B, T, C] from (stage - 1, same tp rank)
    broadcast_token   from the picker, tp rank 0 of the last stage (the only rank with the logits and
                      the RNG stream), to every rank: stage 0 embeds it next, the others need it for
                      their shapes and positions

Every tensor-parallel rank of a stage holds the whole residual stream (it is replicated inside the
stage), so each sends its own copy to its counterpart: tp sends of B*T*C values per boundary and
forward, as Megatron does without its scatter-gather optimisation. A sequence-parallel forward holds
only its chunk of the stream, so each rank sends that, B*T*C/tp values: the optimisation for free.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist

from tpshard.comm.collectives import Collectives, Piece
from tpshard.comm.process_group import complete
from tpshard.parallel.grid import ParallelDims


class PipelineCollectives(Collectives):
    def __init__(
        self,
        tp: Collectives,
        run: dist.ProcessGroup,
        grid: ParallelDims,
        rank: int,
        device: torch.device,
        poll: bool,
    ):
        """tp: the collectives of this rank's stage; run: every rank of the run, with STEP_TIMEOUT;
        rank: this process's global rank."""
        super().__init__()
        self.tp, self.group, self.device, self.poll = tp, run, device, poll
        self.rank, self.world_size = rank, grid.world_size
        stage, tp_rank = grid.coordinates(rank)
        self.previous = grid.rank(stage - 1, tp_rank) if stage > 0 else None
        self.next = grid.rank(stage + 1, tp_rank) if stage < grid.pp - 1 else None
        self.picker = grid.rank(grid.pp - 1, 0)
        self.p2p_seconds = 0.0  # in sends, receives and the token broadcast

    @property
    def picks_tokens(self) -> bool:  # type: ignore[override]
        return self.rank == self.picker

    @property
    def seconds(self) -> float:  # type: ignore[override]
        return self.tp.seconds + self.p2p_seconds

    @property
    def received_bytes(self) -> int:  # type: ignore[override]
        return self.tp.received_bytes

    @property
    def piece_rows(self) -> int:  # type: ignore[override]
        return self.tp.piece_rows

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return self.tp.reduce_partials(partials)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_logits(local)

    def gather_piece(self, rows: torch.Tensor | None, piece: Piece, like: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_piece(rows, piece, like)

    def reduce_piece(self, partials: torch.Tensor, piece: Piece, out: torch.Tensor | None) -> None:
        self.tp.reduce_piece(partials, piece, out)

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        self._wait(lambda: dist.broadcast(token, src=self.picker, group=self.group, async_op=True))
        return token

    def send_forward(self, x: torch.Tensor) -> None:
        assert self.next is not None, "the last stage hands nothing on"
        x = x.contiguous()
        self._wait(lambda: dist.isend(x, dst=self.next, group=self.group), poll=False)

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        assert self.previous is not None, "stage 0 embeds its input"
        x = torch.empty(shape, dtype=dtype, device=device)
        self._wait(lambda: dist.irecv(x, src=self.previous, group=self.group), poll=False)
        return x

    def _wait(self, start: Callable[[], dist.Work], poll: bool | None = None) -> None:
        """poll=False for sends and receives: gloo's point-to-point work reports is_completed() only
        once waited for (torch 2.13), so they block in wait(STEP_TIMEOUT) instead."""
        self.p2p_seconds += complete(start, self.device, self.poll if poll is None else poll)
