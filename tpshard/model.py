"""The GPT model: nanoGPT's architecture and parameter names, written for a process's share of a
tensor-parallel run.

A process hosts one or more *local ranks* out of `tp_size`. Each linear layer holds the local ranks'
slices side by side (rank-major), so one definition serves every runtime:

- dense:       tp_size 1, local ranks (0,)      -> exactly nanoGPT's shapes and state_dict
- simulated:   tp_size N, local ranks (0..N-1)  -> every rank's slice in one process
- distributed: tp_size N, local ranks (r,)      -> one rank's slice; the reduction talks to the group

With a vocab-parallel placement the embedding table is split by vocabulary rows as well: each rank
looks up the tokens in its range (zeros elsewhere), those partial embeddings are reduced like the
others, and the tied lm_head gives each rank the logits of its slice, which are gathered.

Attention's c_attn and the MLP's c_fc are column-parallel (each rank computes its own heads / hidden
units, no communication); the two c_proj are row-parallel: each rank multiplies its slice of the input
by its slice of the weight, giving a partial sum of the full output. Those partials are reduced (the
two sync points of a block), then the c_proj bias is added once.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from tpshard.errors import TpshardError


@dataclass
class GPTConfig:
    """nanoGPT's GPTConfig, field for field."""

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # Beyond nanoGPT, for imported Hugging Face GPT-2 models: HF uses the tanh GELU ("gelu_new").
    activation: str = "gelu"  # "gelu" (exact erf, nanoGPT) or "gelu_new" (tanh approximation, HF GPT-2)
    layer_norm_epsilon: float = 1e-5

    @property
    def gelu_approximate(self) -> str:
        return {"gelu": "none", "gelu_new": "tanh"}[self.activation]


@dataclass(frozen=True)
class Placement:
    """Which tensor-parallel ranks this process holds."""

    tp_size: int = 1
    ranks: tuple[int, ...] = (0,)
    vocab_parallel: bool = False

    @classmethod
    def simulated(cls, tp_size: int, vocab_parallel: bool = False) -> "Placement":
        return cls(tp_size, tuple(range(tp_size)), vocab_parallel)


DENSE = Placement()

# partials [local_ranks, B, T, C] -> full output [B, T, C]
Reduce = Callable[[torch.Tensor], torch.Tensor]
# this process's vocab-sliced logits [B, T, local_ranks * slice] -> every rank's [B, T, tp_size * slice]
Gather = Callable[[torch.Tensor], torch.Tensor]


def sum_local_ranks(partials: torch.Tensor) -> torch.Tensor:
    return partials.sum(0)


def local_logits(logits: torch.Tensor) -> torch.Tensor:
    """No gather needed: this process holds every rank's slice (dense, simulated)."""
    return logits


def row_parallel(x: torch.Tensor, linear: nn.Linear, reduce: Reduce) -> torch.Tensor:
    """x [B, T, R, k] holds each local rank's input slice; linear.weight [C, R*k] their row slices."""
    B, T, R, k = x.shape
    if R == 1:  # one rank: a plain matmul, same kernel as nanoGPT's
        partials = F.linear(x.view(B, T, k), linear.weight).unsqueeze(0)
    else:
        partials = torch.einsum("btrk,crk->rbtc", x, linear.weight.view(-1, R, k))
    out = reduce(partials)
    return out if linear.bias is None else out + linear.bias  # bias once, after the reduction


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for this process's heads only."""

    def __init__(self, model: "GPT", batch_size: int, capacity: int | None = None):
        """capacity: the most tokens it will hold (default and at most block_size); memory is
        allocated for that many up front."""
        attn = model.transformer.h[0].attn
        self.capacity = min(capacity or model.config.block_size, model.config.block_size)
        shape = (batch_size, attn.n_local_heads, self.capacity, attn.head_size)
        param = model.lm_head.weight
        self.keys = [param.new_empty(shape) for _ in range(model.config.n_layer)]
        self.values = [param.new_empty(shape) for _ in range(model.config.n_layer)]
        self.length = 0  # tokens already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, placement: Placement):
        super().__init__()
        self.local_ranks = len(placement.ranks)
        self.heads_per_rank = config.n_head // placement.tp_size
        self.n_local_heads = self.heads_per_rank * self.local_ranks
        self.head_size = config.n_embd // config.n_head
        width = self.n_local_heads * self.head_size
        self.c_attn = nn.Linear(config.n_embd, 3 * width, bias=config.bias)  # column-parallel
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)  # row-parallel

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None, reduce: Reduce) -> torch.Tensor:
        B, T, _ = x.shape
        R, h, hs = self.local_ranks, self.heads_per_rank, self.head_size
        # each local rank's output columns are [q_r; k_r; v_r] for its own heads
        q, k, v = self.c_attn(x).view(B, T, R, 3, h, hs).unbind(3)
        q, k, v = (t.reshape(B, T, R * h, hs).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hs)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(start, T, x.device))
        y = y.transpose(1, 2).reshape(B, T, R, h * hs)
        return row_parallel(y, self.c_proj, reduce)


def _causal_mask(start: int, T: int, device: torch.device) -> torch.Tensor | None:
    """Query i (absolute position start+i) sees keys 0..start+i. None when nothing is hidden."""
    if T == 1:
        return None
    keys = torch.arange(start + T, device=device)
    queries = torch.arange(start, start + T, device=device)
    return keys[None, :] <= queries[:, None]


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, placement: Placement):
        super().__init__()
        self.local_ranks = len(placement.ranks)
        self.approximate = config.gelu_approximate
        hidden = 4 * config.n_embd // placement.tp_size * self.local_ranks
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)  # column-parallel
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)  # row-parallel

    def forward(self, x: torch.Tensor, reduce: Reduce) -> torch.Tensor:
        B, T, _ = x.shape
        h = F.gelu(self.c_fc(x), approximate=self.approximate)
        return row_parallel(h.view(B, T, self.local_ranks, -1), self.c_proj, reduce)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, placement: Placement):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, placement)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config, placement)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None, reduce: Reduce) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache, reduce)  # sync point 1
        return x + self.mlp(self.ln_2(x), reduce)  # sync point 2


class GPT(nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        placement: Placement = DENSE,
        reduce: Reduce = sum_local_ranks,
        gather: Gather = local_logits,
    ):
        super().__init__()
        check_tp(config, placement.tp_size)
        self.config = config
        self.placement = placement
        self.reduce = reduce
        self.gather = gather
        vocab_rows = config.vocab_size
        if placement.vocab_parallel:
            self.vocab_slice = -(-config.vocab_size // placement.tp_size)  # padded up
            vocab_rows = self.vocab_slice * len(placement.ranks)
        self.transformer = nn.ModuleDict(
            dict(
                wte=_embedding(vocab_rows, config.n_embd),
                wpe=_embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config, placement) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, vocab_rows, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    @classmethod
    def from_state_dict(
        cls,
        config: GPTConfig,
        state_dict: dict,
        placement: Placement = DENSE,
        reduce: Reduce = sum_local_ranks,
        gather: Gather = local_logits,
    ) -> "GPT":
        """Adopt the tensors as parameters without copying them (they may be memory-mapped)."""
        with torch.device("meta"):
            model = cls(config, placement, reduce, gather)
        model.load_state_dict(state_dict, assign=True)
        model.transformer.wte.weight = model.lm_head.weight  # assign replaced the tied parameter
        return model.eval()

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits for idx (B, T). With a cache, idx continues the cached tokens.

        last_only: logits of the last position only (all that sampling needs).
        hidden_states: if given, receives the residual stream after the embedding and after each block.
        """
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        limit = cache.capacity if cache is not None else self.config.block_size
        if start + T > limit:
            what = "block_size" if limit == self.config.block_size else "the KV cache's capacity"
            raise ValueError(f"sequence of {start + T} tokens exceeds {what} {limit}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.embed(idx) + self.transformer.wpe(pos)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, layer, cache, self.reduce)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if self.placement.vocab_parallel:
            logits = self.gather(logits)[..., : self.config.vocab_size]  # drop the padding rows' logits
        return logits

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.placement.vocab_parallel:
            return self.transformer.wte(idx)
        # each local rank looks up the tokens of its vocabulary slice; the others contribute zeros
        S, ranks = self.vocab_slice, self.placement.ranks
        first = torch.tensor(ranks, device=idx.device)[:, None, None] * S  # (R, 1, 1)
        local = idx[None] - first  # (R, B, T) ids within each rank's slice
        inside = (local >= 0) & (local < S)
        rows = local.clamp(0, S - 1) + torch.arange(len(ranks), device=idx.device)[:, None, None] * S
        partials = self.transformer.wte(rows) * inside[..., None]
        return self.reduce(partials)


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding whose weights will come from a checkpoint (or random_weights). Zeros skip
    nn.Embedding's normal_ init, which imports torch._dynamo (about 2 s and 70 MB per rank process)."""
    return nn.Embedding(rows, dim, _weight=torch.zeros(rows, dim))


def valid_tp_sizes(config: GPTConfig) -> list[int]:
    """Every N that gives each rank whole heads and an equal share of the MLP's 4*n_embd units: the
    divisors of their gcd, found in sqrt steps (a forged n_head can be 10**9)."""
    n = math.gcd(config.n_head, 4 * config.n_embd)
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def check_tp(config: GPTConfig, tp_size: int) -> None:
    """Megatron needs whole heads and an equal share of the MLP on every rank; say which one fails."""
    if tp_size < 1:
        raise TpshardError(f"--tp {tp_size}: must be at least 1; valid tp sizes for this model: {_listed(config)}")
    failing = [f"{name}={n}" for name, n in (("n_head", config.n_head), ("4*n_embd", 4 * config.n_embd)) if n % tp_size]
    if failing:
        raise TpshardError(
            f"--tp {tp_size} does not divide {' nor '.join(failing)}: every rank needs whole heads; "
            f"valid tp sizes for this model: {_listed(config)}"
        )


def _listed(config: GPTConfig) -> str:
    """valid_tp_sizes for an error message: computed only there, not on every model build."""
    return ", ".join(map(str, valid_tp_sizes(config)))


def parameter_count(config: GPTConfig) -> int:
    """Parameters of the dense model, the tied embedding counted once."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def random_weights(model: GPT, seed: int = 0) -> GPT:
    """Random weights for test and benchmark models: nanoGPT's init scale, and non-zero biases and
    LayerNorm gains so that a bias added twice or a mixed-up norm shows in the numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.02 / math.sqrt(2 * model.config.n_layer) if name.endswith("c_proj.weight") else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            if ".ln_" in name and name.endswith("weight"):
                p.add_(1.0)
    return model
