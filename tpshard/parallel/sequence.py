"""Sequence parallelism (Megatron-LM's, Korthikanti et al. 2022) as a layout of the residual stream.

Tensor parallelism repeats on every rank the work between two sync points that is not split: the
LayerNorms and the residual adds, on the whole sequence. Sequence parallelism cuts that stretch along
the sequence instead: rank r of a stage's N tensor-parallel ranks holds the r-th of N chunks of the
positions, and each collective changes the layout:

    x: chunk        ln_1 -> all-gather -> [a piece] c_attn, attention, c_proj partials
                    -> reduce-scatter -> chunk: + x                 (piece after piece)
    x: chunk        ln_2 -> all-gather -> [a piece] c_fc, gelu, c_proj partials
                    -> reduce-scatter -> chunk: + x                 (piece after piece)
    after the last block: ln_f on the chunk, then one all-gather for the output layer

The same bytes cross as with an all-reduce (which is a reduce-scatter and an all-gather), and a
rank holds 1/N of the residual stream.

A region between an all-gather and a reduce-scatter runs one piece at a time (`region`): a block of
at most piece_rows consecutive positions inside one rank's chunk, in the order of the sequence (the
transport says how many: comm's piece_rows, a few hundred where a call costs microseconds). Its
owner normalizes the piece's rows and broadcasts them, every rank computes its heads' or units'
partial sums for those positions, and they are reduced onto the owner (comm's gather_piece,
reduce_piece), which adds them to its rows of the residual stream. So no rank ever holds the whole
sequence's activations, only its chunk of the residual stream, the keys and values of its heads in
the KV cache (as any schedule does) and one piece's working set: the queries, hidden units and
partial sums of piece_rows positions, not of all of them.
Attention can go piece by piece because it is causal: a piece's queries see the keys of the positions
before it, which the earlier pieces have put in the KV cache.

A length N does not divide is padded at the end to N*c positions: the padding rows are zeros and
belong to no piece, so the blocks leave them as they are, and attention, the KV cache and the logits
see the real positions only.

A forward of one token (a decode step) has nothing to cut: it runs the tensor-parallel schedule
(model.py chooses, forward by forward).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpshard.comm.collectives import PIECE_ROWS, Collectives, Piece
from tpshard.errors import TpshardError


def check_tp(tp_size: int) -> None:
    """Refuse --sequence-parallel where a stage has one tensor-parallel rank: nothing to cut across."""
    if tp_size < 2:
        raise TpshardError(
            "--sequence-parallel cuts the sequence across a stage's tensor-parallel ranks, and at tp 1 there is one: "
            "use tp 2 or more (split --tp, inspect --tp), or leave --sequence-parallel out"
        )


@dataclass(frozen=True)
class SequenceSplit:
    """One forward's positions cut into tp_size chunks of `chunk`; this process hosts `ranks`' (all
    of them simulated, one distributed), which are consecutive."""

    length: int  # the real positions, T
    tp_size: int  # N
    ranks: tuple[int, ...]
    piece_rows: int = PIECE_ROWS  # the most positions in a piece (comm's piece_rows)

    def __post_init__(self) -> None:
        first = self.ranks[0] if self.ranks else 0
        consecutive = list(self.ranks) == list(range(first, first + len(self.ranks)))
        if self.piece_rows < 1:
            raise ValueError(f"pieces of {self.piece_rows} positions")
        if not (self.ranks and consecutive and first >= 0 and self.ranks[-1] < self.tp_size and self.length > 0):
            raise ValueError(
                f"ranks {self.ranks} of tp {self.tp_size}, {self.length} positions: a process hosts "
                "consecutive ranks of the group, of a sequence of at least one position"
            )

    @property
    def chunk(self) -> int:
        """Positions per rank, c: T / N rounded up."""
        return -(-self.length // self.tp_size)

    @property
    def padded(self) -> int:
        """N * c: the length with its padding."""
        return self.chunk * self.tp_size

    def pieces(self) -> list[Piece]:
        """One collective's pieces, in the order of the sequence: each rank's real positions, in blocks
        of at most piece_rows."""
        found: list[Piece] = []
        for owner in range(self.tp_size):
            end = min(self.length, (owner + 1) * self.chunk)
            for start in range(owner * self.chunk, end, self.piece_rows):
                found.append(Piece(owner, start, min(self.piece_rows, end - start), first=not found))
        return found

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """The local ranks' chunks of a whole sequence every rank holds (the token ids): no
        communication. [B, T, ...] -> [B, R*c, ...], padded with zeros."""
        first = self.ranks[0] * self.chunk
        return self._pad(x)[:, first : first + len(self.ranks) * self.chunk]

    def positions(self, start: int, device: torch.device) -> torch.Tensor:
        """The positions of the local ranks' rows, the first of the sequence at `start`; a padding row
        takes the last real position (clear_padding zeroes what it is given)."""
        first = start + self.ranks[0] * self.chunk
        rows = torch.arange(first, first + len(self.ranks) * self.chunk, device=device)
        return rows.clamp(max=start + self.length - 1)

    def clear_padding(self, local: torch.Tensor) -> torch.Tensor:
        """local [B, R*c, C] with its padding rows zero (in place)."""
        local[:, self.real_rows(local).size(1) :] = 0
        return local

    def gather(self, local: torch.Tensor, comm: Collectives, last_only: bool = False) -> torch.Tensor:
        """The whole sequence, padding dropped: [B, R*c, C] -> [B, T, C]. An all-gather; last_only: of
        the last position alone, [B, 1, C] (all that sampling needs)."""
        end = self.length - 1
        pieces = [Piece(end // self.chunk, end, 1, first=True)] if last_only else self.pieces()
        first = pieces[0].start
        whole = local.new_empty((local.size(0), self.length - first, *local.shape[2:]))
        for piece in pieces:
            at = piece.start - first
            whole[:, at : at + piece.rows] = comm.gather_piece(self._held(local, piece), piece, local)
        return whole

    def reduce_scatter(
        self, partials: Callable[[Piece], torch.Tensor], like: torch.Tensor, comm: Collectives
    ) -> torch.Tensor:
        """The local ranks' chunks of a sum computed piece by piece: partials(piece) gives every local
        rank's partial of the piece's positions, [R, B, s, C]; the result is [B, R*c, C] (like's batch,
        width, dtype and device), its padding rows zero. A reduce-scatter."""
        out = like.new_zeros((like.size(0), len(self.ranks) * self.chunk, *like.shape[2:]))
        for piece in self.pieces():
            comm.reduce_piece(partials(piece), piece, self._held(out, piece))
        return out

    def region(
        self,
        x: torch.Tensor,
        norm: Callable[[torch.Tensor], torch.Tensor],
        partials: Callable[[torch.Tensor, int], torch.Tensor],
        bias: torch.Tensor | None,
        comm: Collectives,
        *,
        in_place: bool = False,
    ) -> torch.Tensor:
        """A block's half on this process's chunks x [B, R*c, C]: x + reduce_scatter(partials(all_gather(
        norm(x)))) + bias, one piece at a time. partials(rows, start) maps the normalized rows [B, s, C] of
        positions start .. start+s-1 to every local rank's partial sums of them, [R, B, s, C], and may rely
        on having seen every earlier piece (the KV cache). The owner normalizes its piece, and adds the
        sum and the bias to its rows of x, in the tensor-parallel schedule's order. Padding rows are left
        as they are. in_place: into x itself (each piece's rows are normalized before they are added to),
        else into a copy."""
        out = x if in_place else x.clone()
        for piece in self.pieces():
            mine = self._held(x, piece)
            rows = comm.gather_piece(None if mine is None else norm(mine), piece, x)
            total = None if mine is None else torch.empty_like(mine)
            comm.reduce_piece(partials(rows, piece.start), piece, total)
            if total is not None:
                self._held(out, piece).add_(total if bias is None else total.add_(bias))
        return out

    def real_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The local chunks without their padding rows: what of the sequence this process holds."""
        first = self.ranks[0] * self.chunk
        return local[:, : max(0, self.length - first)]

    def _held(self, local: torch.Tensor, piece: Piece) -> torch.Tensor | None:
        """The piece's rows of local [B, R*c, C] when this process hosts its owner, else None."""
        if piece.owner not in self.ranks:
            return None
        at = piece.start - self.ranks[0] * self.chunk
        return local[:, at : at + piece.rows]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, N*c, ...], zeros at the end."""
        extra = self.padded - x.size(1)
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra)) if extra else x
