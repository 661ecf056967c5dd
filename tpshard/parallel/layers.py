"""The parallel layers: what one process computes of a layer for the tensor-parallel ranks it hosts,
and where it calls the collectives (tpshard.comm). Each layer holds its local ranks' slices side by
side, rank-major, so the same layers serve dense (one rank), simulated (all) and distributed (one of N).

Decoding on a CPU is bound by reading the weights: a step multiplies one token's activations (a few
rows) by every weight matrix once. How fast a matrix streams depends on its memory layout and on the
kernel. GB/s on GPT-2 124M's five decode shapes, float32, this project's 2-core machine (the range over
the shapes; benchmarks/bench_decode.py --kernels; a plain read of the same tensors: 19-29 GB/s on one
thread, 26-46 on two):

                                              1 row, 1 thread   1 row, 2 threads   8 rows, 2 threads
    F.linear, nn.Linear's [out, in]                13-20             13-20               7-12
    F.linear, the weight copied [in, out]          15-21             14-23               7-9
    [in, out] cut in one block of rows per
      thread, one batched product (torch.bmm)        -               24-35              11-15
    oneDNN matmul on the plain weight              15-20             22-31              14-20
    oneDNN prepacked (an opaque copy)              16-22             19-31              20-26
    torch.compile, inductor freezing                 -               13-22               6-7
    `linear` on the decode layout                  15-23             20-39              14-20

MKL's product runs on one thread whatever the thread count, and its dot-product form (nn.Linear's
layout) is slow unless the rows are long (mlp.c_proj's 3072). So `decode_layout` stores a weight
[in, out] when out > in (c_attn, c_fc, lm_head; attn.c_proj when split), and keeps nn.Linear's [out, in]
otherwise (mlp.c_proj; a square attn.c_proj, as fast either way). The parameter stays the [out, in]
tensor it was, a transposed view of the new storage: the same names, shapes and values in
state_dict(), only the strides differ. `linear` then takes, for a float32 decode step on a CPU, the
block split over the threads (MKL's product on one thread) for one row times an [in, out] weight, and
oneDNN's matmul on the plain weight otherwise (an [out, in] weight, or 2 to DECODE_ROWS rows).

Left out: oneDNN's prepacked weights are faster at 8 rows and in bfloat16 (1.5x), but they are an opaque
tensor the parameter would have to keep beside it: twice the memory. torch.compile is slower and
compiles in every process. bfloat16 and float16 stay on F.linear (oneDNN already; the layout is neutral
there, within 5%). A prefill (more than DECODE_ROWS rows) is an ordinary matrix product, as fast in
either layout.
"""


import torch
import torch.nn as nn
from torch.nn import functional as F

from tpshard.comm.collectives import Collectives
from tpshard.files.pages import backed_by_file, drop_inner_pages
from tpshard.parallel import plan
from tpshard.parallel.sequence import SequenceSplit

# Up to this many rows (batch x new tokens) a linear layer is a decode step, streaming its weight.
DECODE_ROWS = 8
DECODE_DTYPES = (torch.float32,)  # bfloat16 and float16 products already go to oneDNN; the split gains nothing
try:  # oneDNN's matmul on a plain strided weight (no prepacking): what F.linear runs for bfloat16
    _onednn_linear = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):
    _onednn_linear = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for weight [out, in] in either memory layout. A float32 decode step
    on a CPU takes the kernel that streams the weight fastest (see the module's docstring): for one
    row times an [in, out]-stored weight MKL's product, split over the threads; else oneDNN's."""
    rows = x.numel() // max(1, x.size(-1))
    if rows > DECODE_ROWS or x.device.type != "cpu" or weight.dtype not in DECODE_DTYPES:
        return F.linear(x, weight, bias)
    if rows == 1 and _transposed(weight):
        parts = torch.get_num_threads()
        y = _split_linear(x.reshape(1, x.size(-1)), weight, parts) if parts > 1 else None
        if y is None:
            return F.linear(x, weight, bias)
        y = y.view(*x.shape[:-1], y.size(-1))
        return y if bias is None else y + bias
    if _onednn_linear is None or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)  # (oneDNN's op has no backward)
    return _onednn_linear(x, weight, bias, "none", [], "")


def _split_linear(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor | None:
    """x [M, in] times an [in, out]-stored weight (weight.t() holds its rows): those rows cut into
    `parts` blocks, one per thread, multiplied as one batched product, the partial sums added up;
    None when the inputs do not cut evenly."""
    out, inp = weight.shape
    if not _transposed(weight) or inp % parts:
        return None
    blocks = weight.t().view(parts, inp // parts, out)
    return torch.bmm(x.view(x.size(0), parts, inp // parts).transpose(0, 1), blocks).sum(0)


def _transposed(weight: torch.Tensor) -> bool:
    """Whether weight [out, in] is a view of [in, out] rows (contiguous or a column slice of them)."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) >= weight.size(0) and weight.size(1) > 1


class Linear(nn.Linear):
    """nn.Linear through `linear`: the output layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(Linear):
    """Each local rank computes its own output columns (heads, hidden units): no communication."""


class RowParallelLinear(nn.Linear):
    """Each local rank multiplies its slice of the input by its slice of the weight, giving a partial
    sum of the full output; the partials are reduced (a sync point), then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, local_ranks: int):
        super().__init__(in_features, out_features, bias=bias)
        self.local_ranks = local_ranks

    def forward(self, x: torch.Tensor, comm: Collectives) -> torch.Tensor:  # type: ignore[override]
        """x [B, T, R, k] -> [B, T, C]: the reduced output, whole on every rank."""
        return self.add_bias(comm.reduce_partials(self.partials(x)))

    def partials(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, R, k] holds each local rank's input slice; weight [C, R*k] their row slices.
        Returns every local rank's partial sum of the output, [R, B, T, C]."""
        B, T, R, k = x.shape
        if R == 1:  # one rank: a plain matmul
            return linear(x.view(B, T, k), self.weight).unsqueeze(0)  # [1, B, T, C]
        # rank r: x[..., r, :] times its rows of weight.T, [k, C] each; one product per rank (threads)
        per_rank = self.weight.t().view(R, k, -1)  # [R, k, C], in either layout (a view)
        return torch.bmm(x.reshape(B * T, R, k).transpose(0, 1), per_rank).view(R, B, T, -1)

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        """out: the sum of the partials, a tensor of its own: the bias is added in place, once."""
        return out if self.bias is None else out.add_(self.bias)


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
    table: nn.Embedding,
    idx: torch.Tensor,
    ranks: tuple[int, ...],
    rows: int,
    comm: Collectives,
    seq: SequenceSplit | None = None,
) -> torch.Tensor:
    """Megatron's VocabParallelEmbedding: each local rank looks up the tokens of its `rows`-row
    vocabulary slice (table holds the local slices side by side), the others contribute zeros, and
    the partial embeddings are reduced like a row-parallel layer's outputs (sequence-parallel,
    reduce-scattered, a piece of the sequence at a time)."""

    def partials(idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (R, B, T, C)
        first = torch.tensor(ranks, device=idx.device)[:, None, None] * rows  # (R, 1, 1)
        local = idx[None] - first  # (R, B, T) ids within each rank's slice
        inside = (local >= 0) & (local < rows)
        at = local.clamp(0, rows - 1) + torch.arange(len(ranks), device=idx.device)[:, None, None] * rows
        return table(at) * inside[..., None]

    if seq is None:
        return comm.reduce_partials(partials(idx))
    like = table.weight[None].expand(idx.size(0), -1, -1)  # [B, rows, C]: the batch, width and dtype (a view)
    return seq.reduce_scatter(lambda piece: partials(idx[:, piece.start : piece.start + piece.rows]), like, comm)


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
        mine = linear(x, self.weight[self.rank * self.rows : (self.rank + 1) * self.rows])
        mine = F.pad(mine, (0, self.rows - mine.size(-1)))  # [B, T, rows]
        return self.comm.gather_logits(mine)[..., : self.weight.size(0)]  # [B, T, V]


# --- the decode layout ----------------------------------------------------------------------------


def decode_layout(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Store each linear layer's weight with its longer dimension contiguous (see the module's
    docstring): a weight [out, in] with out > in becomes a transposed view of a new [in, out]
    tensor, and everything that shared the old parameter (the tied embedding) shares the new one.
    The old copy's memory is let go as the new one fills, so that the weights are held once, not twice:

    - memory-mapped from a file (copy-on-write, never written): its pages are dropped from this
      process as soon as they are copied, CHUNK_BYTES at a time (MADV_DONTNEED: read again, they
      come back from the file as they were);
    - in memory of its own (a merge of rank pieces, a cast): state_dict's entries for it, the
      caller's references, are replaced by the new tensor (equal values and shape), and it is freed
      once nothing else holds it; the largest go first.

    Weights already in that layout, or on another device than the CPU, are left as they are."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    for old in sorted(weights.values(), key=lambda w: -w.numel()):
        out, inp = old.shape
        if old.device.type != "cpu" or out <= inp or _transposed(old) or not old.is_contiguous():
            continue
        mapped = backed_by_file(old)
        new = nn.Parameter(_transposed_copy(old, drop=mapped), requires_grad=old.requires_grad)
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is old:
                    setattr(module, name, new)
        if not mapped and state_dict is not None:
            for key, t in state_dict.items():
                if t.data_ptr() == old.data_ptr() and t.shape == old.shape and t.stride() == old.stride():
                    state_dict[key] = new.detach()


CHUNK_BYTES = 8 << 20


def _transposed_copy(weight: torch.Tensor, drop: bool) -> torch.Tensor:
    """weight [out, in] as a view of a new [in, out] tensor, copied CHUNK_BYTES of weight's rows at a
    time; drop: each chunk's pages are dropped once copied."""
    out, inp = weight.shape
    stored = torch.empty(inp, out, dtype=weight.dtype)
    step = max(1, CHUNK_BYTES // (inp * weight.element_size()))
    with torch.no_grad():
        for first in range(0, out, step):
            rows = weight[first : first + step]
            stored[:, first : first + step].copy_(rows.t())
            if drop:
                drop_inner_pages(rows)
    return stored.t()
