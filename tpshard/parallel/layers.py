"""The parallel layers: what one process computes of a layer for the tensor-parallel ranks it hosts,
and where it calls the collectives (tpshard.comm). Each layer holds its local ranks' slices side by
side, rank-major, so the same layers serve dense (one rank), simulated (all) and distributed (one of N).
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from tpshard.comm.collectives import Collectives
from tpshard.parallel import plan


class ColumnParallelLinear(nn.Linear):
    """Each local rank computes its own output columns (heads, hidden units): no communication."""


class RowParallelLinear(nn.Linear):
    """Each local rank multiplies its slice of the input by its slice of the weight, giving a partial
    sum of the full output; the partials are reduced (a sync point), then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, local_ranks: int):
        super().__init__(in_features, out_features, bias=bias)
        self.local_ranks = local_ranks

    def forward(self, x: torch.Tensor, comm: Collectives) -> torch.Tensor:  # type: ignore[override]
        """x [B, T, R, k] holds each local rank's input slice; weight [C, R*k] their row slices."""
        B, T, R, k = x.shape
        if R == 1:  # one rank: a plain matmul, same kernel as nanoGPT's
            partials = F.linear(x.view(B, T, k), self.weight).unsqueeze(0)  # [1, B, T, C]
        else:
            partials = torch.einsum("btrk,crk->rbtc", x, self.weight.view(-1, R, k))  # [R, B, T, C]
        out = comm.reduce_partials(partials)
        return out if self.bias is None else out + self.bias  # bias once, after the reduction


def parallel_linear(module: str, in_features: int, out_features: int, *, bias: bool, local_ranks: int) -> nn.Linear:
    """The linear layer of `module` ("attn.c_attn", ...) in the style plan.BLOCK_PLAN gives it;
    in_features and out_features are this process's (its local ranks' slices together)."""
    if plan.BLOCK_PLAN[module] is plan.Rule.ROW:
        return RowParallelLinear(in_features, out_features, bias, local_ranks)
    return ColumnParallelLinear(in_features, out_features, bias=bias)


def embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding whose weights will come from a checkpoint. Zeros skip nn.Embedding's normal_ init,
    which imports torch._dynamo (seconds and tens of MB per rank process)."""
    return nn.Embedding(rows, dim, _weight=torch.zeros(rows, dim))


def vocab_parallel_embed(
    table: nn.Embedding, idx: torch.Tensor, ranks: tuple[int, ...], rows: int, comm: Collectives
) -> torch.Tensor:
    """Megatron's VocabParallelEmbedding: each local rank looks up the tokens of its `rows`-row
    vocabulary slice (table holds the local slices side by side), the others contribute zeros, and
    the partial embeddings are reduced like a row-parallel layer's outputs."""
    first = torch.tensor(ranks, device=idx.device)[:, None, None] * rows  # (R, 1, 1)
    local = idx[None] - first  # (R, B, T) ids within each rank's slice
    inside = (local >= 0) & (local < rows)
    at = local.clamp(0, rows - 1) + torch.arange(len(ranks), device=idx.device)[:, None, None] * rows
    partials = table(at) * inside[..., None]  # (R, B, T, C)
    return comm.reduce_partials(partials)


class VocabParallelHead(nn.Module):
    """The output layer split by vocabulary rows (Megatron's parallel output layer) for a shard set
    whose embedding is replicated: each rank multiplies by its share of the rows of the tied embedding
    (a view, nothing copied) and the shares are gathered, so every rank returns the full logits.
    Replicated, every rank would stream the whole V x C matrix, the largest of GPT-2, for every
    token; decoding on CPU is bound by that memory traffic."""

    def __init__(self, weight: nn.Parameter, rank: int, world_size: int, comm: Collectives):
        super().__init__()
        self.weight = weight  # the whole tied embedding: the KV cache and callers read its dtype and device
        self.rank, self.comm = rank, comm
        self.rows = plan.vocab_slice(weight.size(0), world_size)  # padded up: the last rank's share may be shorter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mine = F.linear(x, self.weight[self.rank * self.rows : (self.rank + 1) * self.rows])
        mine = F.pad(mine, (0, self.rows - mine.size(-1)))  # [B, T, rows]
        return self.comm.gather_logits(mine)[..., : self.weight.size(0)]  # [B, T, V]
