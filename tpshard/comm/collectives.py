"""The communication patterns of a tensor-parallel forward, each named once (Megatron-LM's
mappings.py). A process hosts R of the group's N ranks (R = N simulated, R = 1 distributed); the
model calls these and never knows which implementation runs them.

    reduce_partials   partials [R, B, T, C] -> y [B, T, C],   y = sum over all N ranks r of partial_r
                      after each row-parallel layer and the vocab-parallel embedding. Summed in rank
                      order (rank_order_sum), so y is bit-identical on every rank.
    gather_logits     local [B, T, R*S] -> [B, T, N*S],        every rank's S vocabulary columns, in
                      rank order (vocab-parallel output layer)
    broadcast_token   token [B] -> the picker's token [B]      so that every rank feeds its next step
                                                               the token one rank picked (tp rank 0
                                                               of the last pipeline stage)

With sequence parallelism (parallel/sequence.py: rank r holds the r-th of N chunks of the sequence),
Megatron-LM's all-gather before a column-parallel layer and reduce-scatter after a row-parallel one
(gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region), each carried
in pieces: blocks of consecutive positions inside one rank's chunk (Piece), every rank taking the
same pieces in the same order, so that the computation between the two runs one piece at a time
and no rank ever holds the whole sequence's activations, but its keys and values in the KV cache
(Megatron's --tp-comm-overlap and
PyTorch's fused all-gather-matmul / matmul-reduce-scatter cut them the same way):

    gather_piece   rows [B, s, C] of the owner's chunk -> [B, s, C] on every rank: a broadcast from
                   the owner. An all-gather is its pieces, every rank's in turn
    reduce_piece   partials [R, B, s, C] -> out [B, s, C] on the owner: out = sum over all N ranks q
                   of partial_q, in rank order like reduce_partials. A reduce-scatter is its pieces

Over a collective the ranks receive (N-1)/N of the [B, T, C] activations each on average (all of the
sequence but their own chunk; of a reduction, the other ranks' partials of their chunk), as each half
of an all-reduce does; `received_bytes` counts what crossed into this process.

And between pipeline stages (Megatron's p2p_communication):

    send_forward      x [B, T, C] -> the next stage            the residual stream after this stage's
    recv_forward      () -> x [B, T, C] from the previous      last block; each tensor-parallel rank
                                                               sends to the same rank of the next stage
"""

from dataclasses import dataclass

import torch

# Positions per piece of a sequence-parallel collective, for transports whose calls cost microseconds
# (in process, shared memory). A piece's working set grows with it (the MLP's hidden units: rows x 4C/N
# values: GPT-2 124M at tp 2, 256 x 1536 fp32 = 1.5 MiB), the number of collectives shrinks (two per
# piece and region); benchmarks/bench_sequence.py --piece-rows measures the trade-off.
PIECE_ROWS = 256
# Where a call costs a millisecond (gloo over the network stack), their count, not their bytes, would set
# a prefill's time: pieces of up to a rank's whole chunk at the usual lengths (process_group.py).
NETWORK_PIECE_ROWS = 1024


@dataclass(frozen=True)
class Piece:
    """A block of consecutive positions of a sequence-parallel collective, inside one rank's chunk."""

    owner: int  # the tensor-parallel rank whose chunk holds these positions
    start: int  # the first position, in the whole sequence
    rows: int  # positions
    first: bool  # it begins a collective (the pieces of one come in order, the same on every rank)


def rank_order_sum(parts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """parts [N, ...] added up one rank after the other: ((p0 + p1) + p2) + ... Elementwise, so every
    value is the same whatever the shape it sits in (a whole tensor, a piece of it, a shared-memory
    slot), so that every implementation of a reduction gives the same bits: torch.sum over dim 0 does
    not, it reassociates for 5 or more ranks on small tensors (measured, torch 2.13 CPU). Half precision
    is summed in float32 and rounded once, as torch.sum does."""
    if out is None and len(parts) == 1:
        return parts[0]  # one rank: its partial is the sum, no copy (the caller's own tensor)
    if parts.dtype in (torch.float16, torch.bfloat16):
        total = parts[0].float()
        for part in parts[1:]:
            total += part
        return total.to(parts.dtype) if out is None else out.copy_(total)
    out = parts[0].clone() if out is None else out.copy_(parts[0])
    for part in parts[1:]:
        out += part
    return out


class Collectives:
    """The interface, and what it means for a process that hosts every rank (nothing to exchange)."""

    rank = 0  # this process's rank in the run (the tensor-parallel group when there is one stage)
    world_size = 1  # processes in the run
    seconds = 0.0  # spent in cross-process collectives, waiting for the other ranks included
    p2p_seconds = 0.0  # of which in stage hand-overs and the token broadcast across stages
    received_bytes = 0  # of sequence-parallel pieces that crossed into this process from another
    piece_rows = PIECE_ROWS  # the most positions in a piece of a sequence-parallel collective

    def __init__(self) -> None:
        self._in_flight: torch.Tensor | None = None  # a stage's output on its way to the next, in this process

    @property
    def picks_tokens(self) -> bool:
        """Whether this process picks the tokens (it holds the logits and the only RNG stream)."""
        return self.rank == 0

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return rank_order_sum(partials)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def gather_piece(self, rows: torch.Tensor | None, piece: Piece, like: torch.Tensor) -> torch.Tensor:
        """rows: the piece, on the process that hosts its owner (None elsewhere); like: a tensor of the
        piece's batch, width, dtype and device."""
        assert rows is not None, "this process hosts every rank"
        return rows

    def reduce_piece(self, partials: torch.Tensor, piece: Piece, out: torch.Tensor | None) -> None:
        """out: where the owner's process puts the sum (None elsewhere)."""
        assert out is not None, "this process hosts every rank"
        rank_order_sum(partials, out=out)

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        return token

    def send_forward(self, x: torch.Tensor) -> None:
        self._in_flight = x

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        x, self._in_flight = self._in_flight, None
        assert x is not None and x.shape == shape, "a stage's input before the previous stage's output"
        return x


LOCAL = Collectives()  # dense runs (one stage: nothing is ever in flight)
