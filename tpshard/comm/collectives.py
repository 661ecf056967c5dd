"""The communication patterns of a tensor-parallel forward, each named once (Megatron-LM's
mappings.py). A process hosts R of the group's N ranks (R = N simulated, R = 1 distributed); the
model calls these and never knows which implementation runs them.

    reduce_partials   partials [R, B, T, C] -> y [B, T, C],   y = sum over all N ranks r of partial_r
                      after each row-parallel layer and the vocab-parallel embedding. Summed in rank
                      order, so y is bit-identical on every rank.
    gather_logits     local [B, T, R*S] -> [B, T, N*S],        every rank's S vocabulary columns, in
                      rank order (vocab-parallel output layer)
    broadcast_token   token [B] -> rank 0's token [B]          so that every rank feeds its next step
                                                               the token rank 0 picked
"""

import torch


class Collectives:
    """The interface, and what it means for a process that hosts every rank (nothing to exchange)."""

    rank = 0  # this process's rank in the tensor-parallel group; rank 0 picks the tokens
    world_size = 1  # processes in the group
    seconds = 0.0  # spent in cross-process collectives, waiting for the other ranks included

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return partials.sum(0)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        return token


LOCAL = Collectives()  # dense and simulated runs
