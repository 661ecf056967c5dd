"""The communication patterns of a tensor-parallel forward, each named once (Megatron-LM's
mappings.py). A process hosts R of the group's N ranks (R = N simulated, R = 1 distributed); the
model calls these and never knows which implementation runs them.

    reduce_partials   partials [R, B, T, C] -> y [B, T, C],   y = sum over all N ranks r of partial_r
                      after each row-parallel layer and the vocab-parallel embedding. Summed in rank
                      order, so y is bit-identical on every rank.
    gather_logits     local [B, T, R*S] -> [B, T, N*S],        every rank's S vocabulary columns, in
                      rank order (vocab-parallel output layer)
    broadcast_token   token [B] -> the picker's token [B]      so that every rank feeds its next step
                                                               the token one rank picked (tp rank 0
                                                               of the last pipeline stage)

And between pipeline stages (Megatron's p2p_communication):

    send_forward      x [B, T, C] -> the next stage            the residual stream after this stage's
    recv_forward      () -> x [B, T, C] from the previous      last block; each tensor-parallel rank
                                                               sends to the same rank of the next stage
"""

import torch


class Collectives:
    """The interface, and what it means for a process that hosts every rank (nothing to exchange)."""

    rank = 0  # this process's rank in the run (the tensor-parallel group when there is one stage)
    world_size = 1  # processes in the run
    seconds = 0.0  # spent in cross-process collectives, waiting for the other ranks included
    p2p_seconds = 0.0  # of which in stage hand-overs and the token broadcast across stages

    def __init__(self) -> None:
        self._in_flight: torch.Tensor | None = None  # a stage's output on its way to the next, in this process

    @property
    def picks_tokens(self) -> bool:
        """Whether this process picks the tokens (it holds the logits and the only RNG stream)."""
        return self.rank == 0

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return partials.sum(0)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        return token

    def send_forward(self, x: torch.Tensor) -> None:
        self._in_flight = x

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        x, self._in_flight = self._in_flight, None
        assert x is not None and x.shape == shape, "a stage's input before the previous stage's output"
        return x


LOCAL = Collectives()  # dense runs (one stage: nothing is ever in flight)
