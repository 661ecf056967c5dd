"""The Megatron-LM split rules, declared once as data. The model builds its layers from BLOCK_PLAN;
split, merge, reshard, inspect, verify and the sharded loaders read the tensor rules and the sync
points from here.

    attn.c_attn   weight, bias   column, per head: rank r holds [q_r; k_r; v_r] for its heads
    mlp.c_fc      weight, bias   column: rank r holds output rows r*4C/N .. (r+1)*4C/N
    attn.c_proj   weight         row: rank r holds input columns of its heads
    mlp.c_proj    weight         row: rank r holds input columns of its hidden units
    c_proj biases                replicated, added once after the reduction
    everything else              replicated (LayerNorms, wpe, wte; lm_head is tied to wte)

Each row-parallel layer ends in a reduction of the ranks' partial sums: the sync points. With
vocab_parallel (Megatron's VocabParallelEmbedding), wte (and so the tied lm_head) is split by
vocabulary rows instead, padded with zero rows to a multiple of N: one more reduction sums the
embeddings, and the vocab-sliced logits are gathered.

Sequence-parallel (parallel/sequence.py), a forward of more than one token replaces each reduction
by a reduce-scatter, and all-gathers each block's input to attention and to the MLP, and, on the last
stage, the output layer's (of the last position only, when only its logits are wanted): per block 2
of each, each spanning the [B, T, C] activations (carried in pieces) of which each rank receives
(N-1)/N.

Pipeline stages (grid.Stages) each hold their blocks; stage 0 also wte and wpe, the last stage ln_f
and, when there is more than one stage, its own copy of the tied embedding as lm_head.weight (as
Megatron does: the first and last stages are different processes). Stage s hands the residual
stream [B, T, C] to stage s+1: one point-to-point send per tensor-parallel rank and boundary.
"""

import math
from enum import StrEnum

import torch

from tpshard.config import GPTConfig
from tpshard.parallel.grid import Stages

EMBEDDING = "transformer.wte.weight"
OUTPUT = "lm_head.weight"
TIED = {OUTPUT: EMBEDDING}  # stored once, under the embedding's name (twice across pipeline stages)
FIRST_STAGE = ("transformer.wte.weight", "transformer.wpe.weight")


class Rule(StrEnum):
    QKV_COLUMN = "qkv_column"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"

    @property
    def dim(self) -> int | None:
        """The dimension split across ranks, None when every rank holds the whole tensor."""
        return {Rule.QKV_COLUMN: 0, Rule.COLUMN: 0, Rule.ROW: 1, Rule.VOCAB: 0}.get(self)


# The parallel plan of a block, by module (torchtitan's form). A column module's weight and bias are
# split alike; a row module's weight is split by input, its bias replicated (added after the reduction).
BLOCK_PLAN: dict[str, Rule] = {
    "attn.c_attn": Rule.QKV_COLUMN,
    "attn.c_proj": Rule.ROW,
    "mlp.c_fc": Rule.COLUMN,
    "mlp.c_proj": Rule.ROW,
}
# what each row-parallel module computes, for the sentences that explain the sync points
ROLES = {"attn.c_proj": "attention", "mlp.c_proj": "the MLP"}


def rule_for(name: str, vocab_parallel: bool = False) -> Rule:
    """The rule of one stored tensor, by its nanoGPT name."""
    if vocab_parallel and name in (EMBEDDING, OUTPUT):
        return Rule.VOCAB
    for module, rule in BLOCK_PLAN.items():
        if name.endswith(f".{module}.weight"):
            return rule
        if name.endswith(f".{module}.bias"):
            return Rule.REPLICATED if rule is Rule.ROW else rule
    return Rule.REPLICATED


def block_sync_points() -> list[str]:
    """The modules of a block whose outputs are reduced across ranks, in forward order."""
    return [module for module, rule in BLOCK_PLAN.items() if rule is Rule.ROW]


def sync_points(config: GPTConfig, vocab_parallel: bool = False) -> int:
    """Reductions per forward: one after each row-parallel module of every block, plus the
    embedding's when the vocabulary is split."""
    return config.n_layer * len(block_sync_points()) + int(vocab_parallel)


def sync_points_explained(config: GPTConfig, vocab_parallel: bool = False) -> str:
    """Where sync_points' number comes from, in words."""
    after = ", ".join(f"after {ROLES[module]}" for module in block_sync_points())
    why = f"{len(block_sync_points())} per block ({after}) × {config.n_layer} blocks"
    return why + (" + 1 (the vocab-parallel embedding)" if vocab_parallel else "")


def dense_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's dense shape, in nanoGPT's state_dict order (tied lm_head left out).

    Written out, not read off a GPT built on the meta device: the first such build costs about a
    second of lazy imports (Python meta kernels for the weight init), and split, merge and inspect
    need nothing but these shapes. tests/test_model.py holds them to the model's state_dict."""
    C = config.n_embd

    def layer(prefix: str, *weight: int) -> dict[str, tuple[int, ...]]:  # a Linear or a LayerNorm
        return {f"{prefix}.weight": weight, **({f"{prefix}.bias": weight[:1]} if config.bias else {})}

    shapes = {"transformer.wte.weight": (config.vocab_size, C), "transformer.wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes |= layer(f"{h}.ln_1", C) | layer(f"{h}.attn.c_attn", 3 * C, C) | layer(f"{h}.attn.c_proj", C, C)
        shapes |= layer(f"{h}.ln_2", C) | layer(f"{h}.mlp.c_fc", 4 * C, C) | layer(f"{h}.mlp.c_proj", C, 4 * C)
    return shapes | layer("transformer.ln_f", C)


def stored_shapes(config: GPTConfig, pp: int = 1) -> dict[str, tuple[int, ...]]:
    """The dense shape of every tensor a shard set stores: dense_shapes, plus the last stage's copy
    of the tied embedding when there are several stages."""
    shapes = dense_shapes(config)
    return shapes | {OUTPUT: shapes[EMBEDDING]} if pp > 1 else shapes


def stage_of(name: str, stages: Stages) -> int:
    """The pipeline stage that holds a stored tensor."""
    if name in FIRST_STAGE:
        return 0
    if name.startswith("transformer.h."):
        return stages.stage_of(int(name.split(".")[2]))
    return stages.pp - 1  # ln_f, lm_head


def balanced_stages(config: GPTConfig, pp: int, tp: int = 1, vocab_parallel: bool = False) -> Stages:
    """pp stages whose ranks' largest holds the fewest bytes (grid.Stages.balanced), weighing each
    tensor by the values of one rank's piece (a replicated embedding weighs more against the blocks
    as tp grows): the same proportions in every dtype."""
    shapes = stored_shapes(config, pp)
    size = {name: math.prod(piece_shape(name, shape, tp, vocab_parallel)) for name, shape in shapes.items()}
    block = sum(n for name, n in size.items() if name.startswith("transformer.h.0."))
    first = sum(size[name] for name in FIRST_STAGE)
    last = sum(n for name, n in size.items() if name not in FIRST_STAGE and not name.startswith("transformer.h."))
    return Stages.balanced(config.n_layer, pp, block, first, last)


def stage_sync_points(config: GPTConfig, stages: Stages, stage: int, vocab_parallel: bool = False) -> int:
    """Reductions per forward inside one stage's tensor-parallel group."""
    return len(stages.blocks(stage)) * len(block_sync_points()) + int(vocab_parallel and stage == 0)


def stage_sequence_collectives(
    config: GPTConfig, stages: Stages, stage: int, vocab_parallel: bool = False
) -> tuple[int, int]:
    """(reduce-scatters, all-gathers) of a sequence-parallel forward inside one stage's group: each
    reduction becomes a reduce-scatter; each column-parallel module's input is all-gathered (one per
    row-parallel module: they come in pairs), and so is the output layer's on the last stage."""
    gathers = len(stages.blocks(stage)) * len(block_sync_points()) + int(stage == stages.pp - 1)
    return stage_sync_points(config, stages, stage, vocab_parallel), gathers


def sequence_collectives(config: GPTConfig, stages: Stages, vocab_parallel: bool = False) -> tuple[int, int]:
    """(reduce-scatters, all-gathers) of a whole sequence-parallel forward: stage_sequence_collectives
    summed over the stages."""
    counts = [stage_sequence_collectives(config, stages, s, vocab_parallel) for s in range(stages.pp)]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def sequence_collectives_explained(config: GPTConfig, vocab_parallel: bool = False) -> str:
    """Where a sequence-parallel forward's counts come from, in words."""
    per = len(block_sync_points())
    why = f"{per} reduce-scatters and {per} all-gathers per block × {config.n_layer} blocks, "
    why += "+ 1 all-gather before the output layer"
    return why + (" + 1 reduce-scatter (the vocab-parallel embedding)" if vocab_parallel else "")


def vocab_slice(vocab_size: int, tp_size: int) -> int:
    """Rows of the embedding per rank when split by vocabulary (padded up)."""
    return -(-vocab_size // tp_size)


def shard(name: str, tensor: torch.Tensor, rank: int, tp_size: int, vocab_parallel: bool = False) -> torch.Tensor:
    """Rank `rank`'s piece of a dense tensor (a view where the layout allows)."""
    rule = rule_for(name, vocab_parallel)
    if rule is Rule.REPLICATED or tp_size == 1:
        return tensor
    if rule is Rule.VOCAB:  # rows [r*S, (r+1)*S), zero rows past the real vocabulary
        rows = vocab_slice(tensor.size(0), tp_size)
        piece = tensor[rank * rows : (rank + 1) * rows]
        padding = piece.new_zeros(rows - piece.size(0), *tensor.shape[1:])
        return torch.cat([piece, padding]) if padding.numel() else piece
    if rule is Rule.QKV_COLUMN:  # [3C, ...] -> (q, k, v) x ranks -> this rank's q, k, v rows
        per_part = tensor.view(3, tp_size, -1, *tensor.shape[1:])[:, rank]
        return per_part.reshape(-1, *tensor.shape[1:])
    return tensor.chunk(tp_size, dim=rule.dim)[rank]


def unshard(
    name: str, pieces: list[torch.Tensor], vocab_parallel: bool = False, vocab_size: int | None = None
) -> torch.Tensor:
    """The dense tensor from every rank's piece, in rank order (inverse of `shard`; vocab_size drops
    the padding rows of a vocab-parallel embedding)."""
    rule = rule_for(name, vocab_parallel)
    if rule is Rule.REPLICATED or len(pieces) == 1:
        return pieces[0]
    if rule is Rule.VOCAB:
        return torch.cat(pieces)[:vocab_size]
    if rule is Rule.QKV_COLUMN:
        parts = [p.view(3, -1, *p.shape[1:]) for p in pieces]
        stacked = torch.stack(parts, dim=1)  # (q, k, v) x ranks x rows
        return stacked.reshape(-1, *pieces[0].shape[1:])
    return torch.cat(pieces, dim=rule.dim)


def piece_box(
    name: str, piece: torch.Tensor, rank: int, vocab_parallel: bool = False, vocab_size: int | None = None
) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """Where rank's piece lies in the dense tensor, as (offsets, the piece or a view of it): the inverse
    of `shard` one piece at a time, for writers that store a tensor as boxes (DCP). A q, k, v piece
    [q_r; k_r; v_r] is one box of the stacked (3, n_embd, ...) layout only: it is returned viewed as
    (3, n_embd / N, ...). None: the rank holds none of it (the padding rows past the vocabulary), or a
    replicated tensor held whole by rank 0 already."""
    rule = rule_for(name, vocab_parallel)
    if rule is Rule.REPLICATED:
        return ((0,) * piece.dim(), piece) if rank == 0 else None
    if rule is Rule.VOCAB:
        assert vocab_size is not None
        first = rank * piece.size(0)
        rows = min(piece.size(0), vocab_size - first)
        return ((first,) + (0,) * (piece.dim() - 1), piece[:rows]) if rows > 0 else None
    if rule is Rule.QKV_COLUMN:
        part = piece.view(3, piece.size(0) // 3, *piece.shape[1:])
        return (0, rank * part.size(1), *(0,) * (piece.dim() - 1)), part
    offsets = [0] * piece.dim()
    offsets[rule.dim] = rank * piece.size(rule.dim)
    return tuple(offsets), piece


def join_local_ranks(name: str, pieces: list[torch.Tensor], vocab_parallel: bool = False) -> torch.Tensor:
    """The pieces of the ranks one process hosts as one parameter: rank-major along the split dim
    (the layout the model's parallel layers expect, see model.py)."""
    rule = rule_for(name, vocab_parallel)
    if rule is Rule.REPLICATED or len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=rule.dim)


def local_state_dict(pieces: dict[str, list[torch.Tensor]], vocab_parallel: bool = False) -> dict:
    """A state_dict for the GPT of a process's ranks from each tensor's pieces of those ranks, in rank
    order. One stage holding the whole model shares the embedding with the output layer; across
    stages the last has a copy of its own (and the first no output layer)."""
    state = {name: join_local_ranks(name, ranks, vocab_parallel) for name, ranks in pieces.items()}
    if OUTPUT not in state and "transformer.ln_f.weight" in state and EMBEDDING in state:
        state[OUTPUT] = state[EMBEDDING]
    return state


def piece_shape(name: str, dense_shape: tuple[int, ...], tp_size: int, vocab_parallel: bool = False) -> tuple[int, ...]:
    rule = rule_for(name, vocab_parallel)
    shape = list(dense_shape)
    if rule is Rule.VOCAB:
        shape[0] = vocab_slice(shape[0], tp_size)
    elif rule.dim is not None:
        shape[rule.dim] //= tp_size
    return tuple(shape)
