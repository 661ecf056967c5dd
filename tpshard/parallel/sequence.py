"""Sequence parallelism (Megatron-LM's, Korthikanti et al. 2022) as a layout of the residual stream.

Tensor parallelism repeats on every rank the work between two sync points that is not split: the
LayerNorms and the residual adds, on the whole sequence. Sequence parallelism cuts that stretch along
the sequence instead: rank r of a stage's N tensor-parallel ranks holds the r-th of N chunks of the
positions, and each collective changes the layout:

    x: chunk        ln_1 -> all-gather -> [whole sequence] c_attn, attention, c_proj partials
                    -> reduce-scatter -> chunk: + x
    x: chunk        ln_2 -> all-gather -> [whole sequence] c_fc, gelu, c_proj partials
                    -> reduce-scatter -> chunk: + x
    after the last block: ln_f on the chunk, then one all-gather for the output layer

The same bytes cross as with an all-reduce (which is a reduce-scatter and an all-gather), and a
rank holds 1/N of the residual stream. A length N does not divide is padded at the end to N*c
positions: the padding rows are zeros, pass through the LayerNorms and the residual adds (row by
row, never mixed with a real row) and are dropped at each all-gather, so that attention, the KV
cache and the logits see the real positions only.

A forward of one token (a decode step) has nothing to cut: it runs the tensor-parallel schedule
(model.py chooses, forward by forward).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpshard.comm.collectives import Collectives


@dataclass(frozen=True)
class SequenceSplit:
    """One forward's positions cut into tp_size chunks of `chunk`; this process hosts `ranks`' (all
    of them simulated, one distributed), which are consecutive."""

    length: int  # the real positions, T
    tp_size: int  # N
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, length: int, tp_size: int, ranks: tuple[int, ...]) -> "SequenceSplit":
        if list(ranks) != list(range(ranks[0], ranks[0] + len(ranks))):
            raise ValueError(f"ranks {ranks}: a process hosts consecutive ranks")
        return cls(length, tp_size, ranks)

    @property
    def chunk(self) -> int:
        """Positions per rank, c: T / N rounded up."""
        return -(-self.length // self.tp_size)

    @property
    def padded(self) -> int:
        """N * c: the length with its padding."""
        return self.chunk * self.tp_size

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """The local ranks' chunks of a whole sequence every rank holds (the embedding): no
        communication. [B, T, C] -> [B, R*c, C]."""
        first = self.ranks[0] * self.chunk
        return self._pad(x)[:, first : first + len(self.ranks) * self.chunk]

    def gather(self, local: torch.Tensor, comm: Collectives) -> torch.Tensor:
        """The whole sequence, padding dropped: [B, R*c, C] -> [B, T, C]."""
        return comm.all_gather_sequence(local)[:, : self.length]

    def reduce_scatter(self, partials: torch.Tensor, comm: Collectives) -> torch.Tensor:
        """The local ranks' chunks of the sum of every rank's partials: [R, B, T, C] -> [B, R*c, C]."""
        return comm.reduce_scatter_sequence(self._pad(partials, dim=2))

    def real_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The local chunks without their padding rows: what of the sequence this process holds."""
        first = self.ranks[0] * self.chunk
        return local[:, : max(0, self.length - first)]

    def _pad(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        extra = self.padded - x.size(dim)
        if not extra:
            return x
        return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, extra))
