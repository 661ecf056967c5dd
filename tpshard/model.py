"""The GPT model: nanoGPT's architecture and parameter names, written for a process's share of a
tensor-parallel run, one definition for every runtime.

A process hosts one or more *local ranks* out of `tp_size` (its Placement, see parallel/grid.py).
Each linear layer is built in the style parallel/plan.py's BLOCK_PLAN gives it and holds the local
ranks' slices side by side (rank-major):

- dense:       tp_size 1, local ranks (0,)      -> exactly nanoGPT's shapes and state_dict
- simulated:   tp_size N, local ranks (0..N-1)  -> every rank's slice in one process
- distributed: tp_size N, local ranks (r,)      -> one rank's slice; the collectives talk to the group

With a vocab-parallel placement the embedding table is split by vocabulary rows as well: each rank
looks up the tokens in its range (zeros elsewhere), those partial embeddings are reduced like the
others, and the tied lm_head gives each rank the logits of its slice, which are gathered.

With sequence_parallel, a forward of more than one token keeps the residual stream cut along the
sequence between the sync points (parallel/sequence.py): each reduction becomes a reduce-scatter and
each block's input to attention and to the MLP an all-gather, and each half of a block runs a piece of
the sequence at a time (the layers' `partials` and `heads`/`units`, through SequenceSplit.region). A
one-token decode step runs the tensor-parallel schedule.

All communication goes through `comm` (tpshard.comm): the model never knows which runtime it is in.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from tpshard.comm.collectives import LOCAL, Collectives
from tpshard.config import GPTConfig
from tpshard.parallel import plan
from tpshard.parallel.grid import DENSE, Placement, check_tp
from tpshard.parallel.layers import Linear, decode_layout, embedding, parallel_linear, vocab_parallel_embed
from tpshard.parallel.sequence import SequenceSplit


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for this process's heads only."""

    def __init__(self, model: "GPT", batch_size: int, capacity: int | None = None, *, scratch: bool = False):
        """capacity: the most tokens it will hold (default and at most block_size); memory is
        allocated for that many up front. scratch: one forward's keys and values, kept by no one after
        it: every layer shares one buffer (a layer's are needed only while it runs)."""
        blocks = model.transformer.h
        attn = next(iter(blocks.values())).attn
        self.capacity = min(capacity or model.config.block_size, model.config.block_size)
        shape = (batch_size, attn.n_local_heads, self.capacity, attn.head_size)
        param = next(model.parameters())
        shared = (param.new_empty(shape), param.new_empty(shape)) if scratch else None
        self.keys = {int(layer): shared[0] if shared else param.new_empty(shape) for layer in blocks}
        self.values = {int(layer): shared[1] if shared else param.new_empty(shape) for layer in blocks}
        self.length = 0  # tokens already stored

    def store(self, layer: int, at: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep k, v [B, heads, T, hs] of positions at .. at+T-1; returns the keys and values of every
        position up to the last of them."""
        end = at + k.size(2)
        self.keys[layer][:, :, at:end] = k
        self.values[layer][:, :, at:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, placement: Placement):
        super().__init__()
        self.local_ranks = len(placement.ranks)
        self.heads_per_rank = config.n_head // placement.tp_size
        self.n_local_heads = self.heads_per_rank * self.local_ranks
        self.head_size = config.n_embd // config.n_head
        width = self.n_local_heads * self.head_size
        R, C, bias = self.local_ranks, config.n_embd, config.bias
        self.c_attn = parallel_linear("attn.c_attn", C, 3 * width, bias=bias, local_ranks=R)
        self.c_proj = parallel_linear("attn.c_proj", width, C, bias=bias, local_ranks=R)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None, comm: Collectives) -> torch.Tensor:
        """x [B, T, C], the tokens after the cached ones: the output, reduced."""
        return self.c_proj(self.heads(x, layer, cache, cache.length if cache is not None else 0), comm)

    def partials(self, x: torch.Tensor, layer: int, cache: KVCache, start: int) -> torch.Tensor:
        """x [B, T, C] at positions start .. start+T-1, every earlier position in the cache: every local
        rank's partial sum of the output, [R, B, T, C] (sequence-parallel, one piece)."""
        return self.c_proj.partials(self.heads(x, layer, cache, start))

    def heads(self, x: torch.Tensor, layer: int, cache: KVCache | None, start: int) -> torch.Tensor:
        """Each local head's attention output for x [B, T, C] at positions start ..: [B, T, R, h*hs]."""
        B, T, _ = x.shape
        R, h, hs = self.local_ranks, self.heads_per_rank, self.head_size
        # each local rank's output columns are [q_r; k_r; v_r] for its own heads
        q, k, v = self.c_attn(x).view(B, T, R, 3, h, hs).unbind(3)  # each (B, T, R, h, hs)
        q, k, v = (t.reshape(B, T, R * h, hs).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hs)
        if cache is not None:
            k, v = cache.store(layer, start, k, v)  # (B, heads, start+T, hs)
        if T == 1:  # a decode step sees every key
            y = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:  # a prefill: the kernel's own causal mask, none materialized ([T, T] floats)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i (position start+i) sees keys 0 .. start+i
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(start, T, x.device))
        return y.transpose(1, 2).reshape(B, T, R, h * hs)  # each local rank's heads together


def _causal_mask(start: int, T: int, device: torch.device) -> torch.Tensor:
    """Query i (absolute position start+i) sees keys 0..start+i: [T, start+T] booleans. (torch's
    causal_lower_right bias would let CUDA's fused kernels take it, but its module imports
    torch._dynamo: seconds and tens of MB per rank process.)"""
    keys = torch.arange(start + T, device=device)
    queries = torch.arange(start, start + T, device=device)
    return keys[None, :] <= queries[:, None]


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, placement: Placement):
        super().__init__()
        self.local_ranks = len(placement.ranks)
        self.approximate = config.gelu_approximate
        hidden = 4 * config.n_embd // placement.tp_size * self.local_ranks
        R, C, bias = self.local_ranks, config.n_embd, config.bias
        self.c_fc = parallel_linear("mlp.c_fc", C, hidden, bias=bias, local_ranks=R)
        self.c_proj = parallel_linear("mlp.c_proj", hidden, C, bias=bias, local_ranks=R)

    def forward(self, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        """x [B, T, C]: the output, reduced."""
        return self.c_proj(self.units(x), comm)

    def partials(self, x: torch.Tensor) -> torch.Tensor:
        """Every local rank's partial sum of the output, [R, B, T, C] (sequence-parallel, one piece)."""
        return self.c_proj.partials(self.units(x))

    def units(self, x: torch.Tensor) -> torch.Tensor:
        """The local hidden units after the GELU, [B, T, R, hidden per rank]."""
        B, T, _ = x.shape
        h = self.c_fc(x)
        if torch.is_grad_enabled():
            h = F.gelu(h, approximate=self.approximate)
        else:  # in place: the hidden units, the largest activation of a prefill, held once
            torch.ops.aten.gelu_(h, approximate=self.approximate)
        return h.view(B, T, self.local_ranks, -1)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, placement: Placement):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, placement)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config, placement)

    def forward(
        self, x: torch.Tensor, layer: int, cache: KVCache | None, comm: Collectives, seq: SequenceSplit | None = None
    ) -> torch.Tensor:
        """x [B, T, C]; sequence-parallel, this process's chunks [B, R*c, C] (and so is the output),
        with a cache (a scratch one when the caller keeps none)."""
        if seq is None:
            x = x + self.attn(self.ln_1(x), layer, cache, comm)  # the block's input is left as it was
            out = self.mlp(self.ln_2(x), comm)
            return x + out if torch.is_grad_enabled() else x.add_(out)  # x is the block's own: in place
        assert cache is not None, "sequence-parallel attention goes a piece at a time, through a cache"
        start = cache.length  # of the sequence: its pieces' positions count from 0

        def attention(rows: torch.Tensor, at: int) -> torch.Tensor:
            return self.attn.partials(rows, layer, cache, start + at)

        x = seq.region(x, self.ln_1, attention, self.attn.c_proj.bias, comm)
        mlp = self.mlp.partials
        return seq.region(x, self.ln_2, lambda rows, _: mlp(rows), self.mlp.c_proj.bias, comm, in_place=True)


class GPT(nn.Module):
    sequence_parallel = False  # cut forwards of more than one token along the sequence (parallel/sequence.py)
    piece_rows: int | None = None  # positions per sequence-parallel piece; None: the transport's (comm.piece_rows)

    def __init__(self, config: GPTConfig, placement: Placement = DENSE, comm: Collectives = LOCAL):
        super().__init__()
        check_tp(config, placement.tp_size)
        self.config = config
        self.placement = placement
        self.comm = comm
        self.stages = placement.stage_plan(config.n_layer)
        self.stages.check(config)
        self.first = 0 in placement.hosted  # holds the embeddings
        self.last = self.stages.pp - 1 in placement.hosted  # holds ln_f and the output layer
        vocab_rows = config.vocab_size
        if placement.vocab_parallel:
            self.vocab_slice = plan.vocab_slice(config.vocab_size, placement.tp_size)
            vocab_rows = self.vocab_slice * len(placement.ranks)
        # keyed by block index, so that a stage's parameters keep nanoGPT's names (transformer.h.7...)
        layers = [layer for stage in placement.hosted for layer in self.stages.blocks(stage)]
        modules: dict[str, nn.Module] = {}  # in nanoGPT's order, which is its state_dict's
        if self.first:
            modules |= {"wte": embedding(vocab_rows, config.n_embd), "wpe": embedding(config.block_size, config.n_embd)}
        modules["h"] = nn.ModuleDict({str(i): Block(config, placement) for i in layers})
        if self.last:
            modules["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.transformer = nn.ModuleDict(modules)
        if self.last:
            self.lm_head = Linear(config.n_embd, vocab_rows, bias=False)
            self._tie()

    @classmethod
    def from_state_dict(
        cls, config: GPTConfig, state_dict: dict, placement: Placement = DENSE, comm: Collectives = LOCAL
    ) -> "GPT":
        """Adopt the tensors as parameters without copying them (they may be memory-mapped), but for
        the weights decode_layout stores transposed (parallel/layers.py: one copy, the old let go)."""
        with torch.device("meta"):
            model = cls(config, placement, comm)
        model.load_state_dict(state_dict, assign=True)
        model._tie()  # assign replaced the tied parameter
        decode_layout(model, state_dict)  # weights stored as decoding streams them fastest (parallel/layers.py)
        return model.eval()

    def _tie(self) -> None:
        """One tensor for the embedding and the output layer, as in nanoGPT, when one stage holds
        both; pipeline stages each hold their own (split writes the last stage a copy)."""
        if self.first and self.last and not self.placement.pipelined:
            self.transformer.wte.weight = self.lm_head.weight

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
        hidden_states: if given, receives the residual stream after the embedding and after each
        block (of the stages this process holds); sequence-parallel, this process's chunks of it,
        without their padding (in rank order they make the whole).

        A process without the last stage receives its first stage's input from the stage before
        (stage 0 embeds idx), hands its output on, and returns no logits: a [B, T, 0] tensor (it
        holds no column of the vocabulary). Every stage gets idx, for its shapes and positions.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        limit = cache.capacity if cache is not None else self.config.block_size
        if start + T > limit:
            what = "block_size" if limit == self.config.block_size else "the KV cache's capacity"
            raise ValueError(f"sequence of {start + T} tokens exceeds {what} {limit}")
        seq = self.sequence_split(T)
        if seq is not None and torch.is_grad_enabled():
            raise ValueError(
                "the sequence-parallel schedule runs inference only (its keys and values go into a cache, a piece "
                "at a time, in place): call the model under torch.inference_mode() or torch.no_grad()"
            )
        kv = cache if cache is not None or seq is None else KVCache(self, B, T, scratch=True)
        x = torch.empty(0)
        for stage in self.placement.hosted:
            if stage == 0:
                x = self.embed(idx, start, seq)  # (B, T, C), or the chunks (B, R*c, C)
                if hidden_states is not None:
                    hidden_states.append(x if seq is None else seq.real_rows(x))
            else:
                rows = T if seq is None else seq.chunk * len(self.placement.ranks)
                x = self.comm.recv_forward((B, rows, self.config.n_embd), self.dtype, idx.device)
            for layer in self.stages.blocks(stage):
                x = self.transformer.h[str(layer)](x, layer, kv, self.comm, seq)
                if hidden_states is not None:
                    hidden_states.append(x if seq is None else seq.real_rows(x))
            if stage < self.stages.pp - 1:
                self.comm.send_forward(x)
        if cache is not None:
            cache.length += T
        if not self.last:
            return x.new_empty(B, 1 if last_only else T, 0)
        x = self.transformer.ln_f(x)
        if seq is not None:
            x = seq.gather(x, self.comm, last_only)  # the output layer's input: the whole sequence, or its end
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if self.placement.vocab_parallel:
            logits = self.comm.gather_logits(logits)[..., : self.config.vocab_size]  # drop the padding rows' logits
        return logits

    def sequence_split(self, T: int) -> SequenceSplit | None:
        """How a forward of T tokens is cut along the sequence: None for the tensor-parallel schedule
        (not sequence_parallel, or a one-token step: nothing to cut)."""
        if not self.sequence_parallel or T == 1:
            return None
        return SequenceSplit(T, self.placement.tp_size, self.placement.ranks, self.piece_rows or self.comm.piece_rows)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, idx: torch.Tensor, start: int, seq: SequenceSplit | None = None) -> torch.Tensor:
        """The token and position embeddings of idx (B, T) at positions start ..: (B, T, C);
        sequence-parallel, this process's chunks (B, R*c, C), looked up for their positions only."""
        wte, T, device = self.transformer.wte, idx.size(1), idx.device
        positions = torch.arange(start, start + T, device=device) if seq is None else seq.positions(start, device)
        if self.placement.vocab_parallel:  # reduced, or reduce-scattered, like a row-parallel output
            ranks, rows = self.placement.ranks, self.vocab_slice
            tokens = vocab_parallel_embed(wte, idx, ranks, rows, self.comm, seq)
        else:
            tokens = wte(idx if seq is None else seq.scatter(idx))
        x = tokens + self.transformer.wpe(positions)
        return x if seq is None else seq.clear_padding(x)
