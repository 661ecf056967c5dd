"""The facts behind `tpshard inspect`, as data: what a checkpoint, a shard set or a lone rank file holds,
and how a checkpoint splits N ways under plan.py's rules. Nothing here prints: the CLI renders these
reports, or dumps them as JSON (every report is a dataclass of plain values).

    checkpoint   ckpt.pt, a dense .safetensors, a Hugging Face GPT-2 directory: model, weights,
                 tokenizer, optimizer state (sized from the archive, never read), the split plan
    shards       a shard directory: the manifest in brief, every rank's file, one block's data flow,
                 the pipeline stages (if any), an integrity check (sha256 on request)
    rank_file    one rank's .safetensors: which rank of which set, its tensors
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tpshard.comm.collectives import NETWORK_PIECE_ROWS, PIECE_ROWS
from tpshard.config import GPTConfig
from tpshard.convert import choose_stages
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import Checkpoint, model_args
from tpshard.files.digests import sha256_file
from tpshard.files.manifest_file import MANIFEST, read_manifest
from tpshard.files.nanogpt import read_checkpoint_file
from tpshard.files.paths import Kind, checkpoint_file, kind_of, load_checkpoint
from tpshard.files.shardset import Manifest, ShardSet, rank_file_identity, tensor_table
from tpshard.files.tensorfile import DTYPE_NAMES, DTYPES, NAMES_BY_CODE, open_safetensors
from tpshard.parallel import plan, sequence
from tpshard.parallel.grid import ParallelDims, Stages, check_tp, valid_tp_sizes
from tpshard.tokenizer import find_tokenizer

# --- the split plan -------------------------------------------------------------------------------


@dataclass
class TensorSplit:
    """One tensor of the dense model and its piece on each rank (every rank's piece has one shape)."""

    name: str
    shape: list[int]
    rule: str  # plan.Rule value, or "tied" for lm_head (stored once, as wte)
    split: str  # what each rank holds, in words: "column per head: q,k,v heads 0-5 | 6-11"
    rank_shape: list[int]
    rank_bytes: int  # bytes of this tensor on each rank; 0 for the tied lm_head


@dataclass
class SplitPlan:
    tp_size: int
    valid_tp_sizes: list[int]
    vocab_parallel: bool
    dtype: str
    tensors: list[TensorSplit]
    dense_bytes: int  # the stored tensors once (tied lm_head not counted twice)
    rank_bytes: int  # one rank's tensors, replicated ones included
    replicated_bytes: int  # the part of rank_bytes that every rank holds whole
    sync_points_per_forward: int  # all-reduces per forward pass: 2 per layer (+1 vocab-parallel); 0 at tp 1
    sync_points_once_split: int  # the same at any tp above 1 (plan.sync_points)
    sync_points_per_layer: int  # one per row-parallel module of a block
    sync_point_roles: list[str]  # what each of a layer's reductions follows: "attention", "the MLP"
    allreduce_payload_bytes: int  # one all-reduce, one token: n_embd activations of dtype
    allreduce_bytes_per_token: int  # sync_points_per_forward * allreduce_payload_bytes
    logits_gather_bytes_per_token: int  # vocab-parallel only: the gathered logits of one token


def _ranges(starts: list[int], width: int) -> str:
    """'0-5 | 6-11' for ranks starting at 0 and 6, each `width` wide; long lists elided in the middle."""
    parts = [str(s) if width == 1 else f"{s}-{s + width - 1}" for s in starts]
    if len(parts) > 4:
        parts = [*parts[:2], "…", parts[-1]]
    return " | ".join(parts)


def describe_split(name: str, shape: tuple[int, ...], config: GPTConfig, tp_size: int, vocab_parallel: bool) -> str:
    """What rank 0, 1, ... hold of a tensor, in words."""
    rule = plan.rule_for(name, vocab_parallel)
    if rule is plan.Rule.QKV_COLUMN:
        heads = config.n_head // tp_size
        return f"column per head: q,k,v heads {_ranges([r * heads for r in range(tp_size)], heads)}"
    if rule is plan.Rule.VOCAB:
        rows = plan.vocab_slice(shape[0], tp_size)
        return f"vocab rows {_ranges([r * rows for r in range(tp_size)], rows)} (padded to {rows * tp_size})"
    if rule is plan.Rule.REPLICATED:
        if name.endswith("c_proj.bias"):
            return "replicated, added after the all-reduce"
        return "replicated"
    width = shape[rule.dim] // tp_size
    what = "outputs" if rule is plan.Rule.COLUMN else "inputs"
    return f"{rule.value}: {what} {_ranges([r * width for r in range(tp_size)], width)}"


def split_plan(config: GPTConfig, dtype: torch.dtype, tp_size: int = 1, vocab_parallel: bool = False) -> SplitPlan:
    """How `tpshard split --tp tp_size` would cut a model stored in dtype (raises TpshardError when
    tp_size does not divide it)."""
    check_tp(config, tp_size)
    itemsize = dtype.itemsize
    tensors = []
    for name, shape in plan.dense_shapes(config).items():
        piece = plan.piece_shape(name, shape, tp_size, vocab_parallel)
        tensors.append(
            TensorSplit(
                name=name,
                shape=list(shape),
                rule=plan.rule_for(name, vocab_parallel).value,
                split=describe_split(name, shape, config, tp_size, vocab_parallel),
                rank_shape=list(piece),
                rank_bytes=itemsize * _numel(piece),
            )
        )
    by_name = {t.name: t for t in tensors}
    for tied, source in plan.TIED.items():  # listed like nanoGPT's state_dict, stored once
        s = by_name[source]
        tensors.append(TensorSplit(tied, s.shape, "tied", f"tied to {source}", s.rank_shape, 0))
    once_split = plan.sync_points(config, vocab_parallel)
    syncs = once_split if tp_size > 1 else 0
    payload = config.n_embd * itemsize
    return SplitPlan(
        tp_size=tp_size,
        valid_tp_sizes=valid_tp_sizes(config),
        vocab_parallel=vocab_parallel,
        dtype=DTYPE_NAMES[dtype],
        tensors=tensors,
        dense_bytes=sum(itemsize * _numel(t.shape) for t in tensors if t.rule != "tied"),
        rank_bytes=sum(t.rank_bytes for t in tensors),
        replicated_bytes=sum(t.rank_bytes for t in tensors if t.rule == plan.Rule.REPLICATED),
        sync_points_per_forward=syncs,
        sync_points_once_split=once_split,
        sync_points_per_layer=len(plan.block_sync_points()),
        sync_point_roles=[plan.ROLES[module] for module in plan.block_sync_points()],
        allreduce_payload_bytes=payload,
        allreduce_bytes_per_token=syncs * payload,
        logits_gather_bytes_per_token=(
            plan.vocab_slice(config.vocab_size, tp_size) * tp_size * itemsize if vocab_parallel and tp_size > 1 else 0
        ),
    )


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _parameters(config: GPTConfig) -> int:
    """model.parameter_count without building a model (see plan.dense_shapes): the tied lm_head once."""
    return sum(_numel(shape) for shape in plan.dense_shapes(config).values())


# --- the stage plan -------------------------------------------------------------------------------


@dataclass
class StageFacts:
    """One pipeline stage as split would write it: what its ranks hold, do and send."""

    stage: int
    ranks: list[int]  # global ranks: its tensor-parallel group
    blocks: list[int]  # first and last block
    holds: str  # in words: "wte, wpe, blocks 0-5"
    rank_bytes: int  # one rank's tensors
    all_reduces: int  # per forward, inside the stage's tensor-parallel group (0 at tp 1)
    send_bytes_per_token: int  # to the next stage, per rank (0 for the last stage)
    kv_cache_bytes: int  # one rank's KV cache for one sequence of block_size tokens
    memory_bytes: int  # rank_bytes + kv_cache_bytes: what one rank needs, activations aside


def stage_plan(
    config: GPTConfig, dtype: torch.dtype, tp: int, stages: Stages, vocab_parallel: bool = False
) -> list[StageFacts]:
    """Each stage of a tp x pp split: blocks, bytes per rank, collectives, hand-overs, memory."""
    grid = ParallelDims(tp, stages.pp)
    manifest = Manifest(
        grid, config, dtype, tensor_table(config, vocab_parallel, stages.pp), [], {}, vocab_parallel=vocab_parallel
    )
    manifest.stages = stages
    facts = []
    for s in range(stages.pp):
        blocks = stages.blocks(s)
        layout = manifest.layout(grid.rank(s, 0))
        weights = sum(d.itemsize * _numel(shape) for _, d, shape in layout)
        kv = 2 * len(blocks) * config.block_size * (config.n_embd // tp) * dtype.itemsize
        span = f"block {blocks.start}" if len(blocks) == 1 else f"blocks {blocks.start}-{blocks.stop - 1}"
        held = [*(["wte", "wpe"] if s == 0 else []), span]
        held += ["ln_f", "lm_head" + (" (wte's copy)" if stages.pp > 1 else "")] if s == stages.pp - 1 else []
        facts.append(
            StageFacts(
                stage=s,
                ranks=grid.tp_group(grid.rank(s, 0)),
                blocks=[blocks.start, blocks.stop - 1],
                holds=", ".join(held),
                rank_bytes=weights,
                all_reduces=plan.stage_sync_points(config, stages, s, vocab_parallel) if tp > 1 else 0,
                send_bytes_per_token=config.n_embd * dtype.itemsize if s < stages.pp - 1 else 0,
                kv_cache_bytes=kv,
                memory_bytes=weights + kv,
            )
        )
    return facts


# --- the data flow of one block -------------------------------------------------------------------


@dataclass
class Step:
    op: str
    kind: str  # replicated | column | row | local | all-reduce | add
    detail: str


@dataclass
class Branch:
    name: str
    steps: list[Step]


def block_flow(config: GPTConfig, tp_size: int, itemsize: int, sequence_parallel: bool = False) -> list[Branch]:
    """One transformer block under tensor parallelism, from plan.BLOCK_PLAN: which linears are column
    or row split, and the all-reduce after each row-parallel one (its bias comes after: added once,
    not once per rank). sequence_parallel: the schedule of a forward of more than one token
    (parallel/sequence.py): the LayerNorm and the residual add on each rank's chunk of the sequence,
    an all-gather before each column-parallel module, a reduce-scatter in place of each all-reduce."""
    heads = config.n_head // tp_size
    width = heads * (config.n_embd // config.n_head)
    hidden = 4 * config.n_embd // tp_size
    C = config.n_embd
    qkv_heads = _ranges([r * heads for r in range(tp_size)], heads)
    shapes = {
        "attn.c_attn": f"{C} -> 3 x {width} per rank (q,k,v heads {qkv_heads})",
        "attn.c_proj": f"{width} inputs -> a partial sum of all {C} outputs",
        "mlp.c_fc": f"{C} -> {hidden} hidden units per rank",
        "mlp.c_proj": f"{hidden} inputs -> a partial sum of all {C} outputs",
    }
    sync_points = plan.block_sync_points()
    per_token = f"{C} values x {itemsize} B per token"
    moved = f"{C} x {itemsize} B per position, (N-1)/N of them received per rank"
    pieces = f"a piece of at most {PIECE_ROWS} positions at a time ({NETWORK_PIECE_ROWS} over gloo, NCCL)"

    def linear(module: str) -> list[Step]:
        rule = plan.BLOCK_PLAN[module]
        number = sync_points.index(module if rule is plan.Rule.ROW else _pair(module)) + 1
        if rule is not plan.Rule.ROW:
            how = "column, per head" if rule is plan.Rule.QKV_COLUMN else "column"
            step = Step(module, "column", f"{how}: {shapes[module]}")
            what = f"the sequence from the chunks, {pieces}, each from its owner: {moved}"
            gather = Step(f"ALL-GATHER #{number}", "all-gather", what)
            return [gather, step] if sequence_parallel else [step]
        if sequence_parallel:
            what = f"sum the {tp_size} ranks' partials of each piece onto its owner, each keeps its chunk: {moved}"
            reduce = Step(f"REDUCE-SCATTER #{number}", "reduce-scatter", what)
        else:
            reduce = Step(f"ALL-REDUCE #{number}", "all-reduce", f"sum the {tp_size} ranks' partials: {per_token}")
        where = "to its chunk" if sequence_parallel else "after the reduction"
        bias = [Step(f"+ {module}.bias", "add", f"replicated, added once {where}")] if config.bias else []
        return [Step(module, "row", f"row: {shapes[module]}"), reduce, *bias]

    def norm(name: str) -> Step:
        if sequence_parallel:
            return Step(name, "chunk", f"on this rank's chunk of the sequence: 1/{tp_size} of the positions")
        return Step(name, "replicated", f"every rank normalizes the whole residual stream ({C})")

    if sequence_parallel:
        residual = Step("+ residual", "chunk", f"on the chunk: each rank holds 1/{tp_size} of the residual stream")
    else:
        residual = Step("+ residual", "add", "every rank holds the same full activations again")
    attention = [
        norm("ln_1"),
        *linear("attn.c_attn"),
        Step("attention", "local", f"{heads} local head{'s' * (heads != 1)} per rank, own KV cache, no communication"),
        *linear("attn.c_proj"),
        residual,
    ]
    mlp = [
        norm("ln_2"),
        *linear("mlp.c_fc"),
        Step("gelu", "local", "elementwise on the local units, no communication"),
        *linear("mlp.c_proj"),
        residual,
    ]
    return [Branch("attention", attention), Branch("mlp", mlp)]


def _pair(column: str) -> str:
    """The row-parallel module a column-parallel one feeds (attn.c_attn -> attn.c_proj)."""
    return next(m for m in plan.block_sync_points() if m.split(".")[0] == column.split(".")[0])


@dataclass
class SequenceSchedule:
    """inspect --sequence-parallel: what a forward of more than one token does (parallel/sequence.py)."""

    before_blocks: list[Step]  # stage 0: the embeddings, cut into chunks
    block: list[Branch]  # one block's schedule
    after_blocks: list[Step]  # the last stage: ln_f on the chunk, the all-gather, the output layer
    pieces: str  # how the region between an all-gather and a reduce-scatter runs
    reduce_scatters_per_forward: int  # summed over the stages
    all_gathers_per_forward: int
    # received per rank, for a length tp divides: (N-1)/N of each's activations, the output layer's all-gather
    # counted over every position as in a full forward (generating gathers the last position only)
    moved_bytes_per_token: int
    all_reduce_bytes_per_token: int  # what the tensor-parallel schedule reduces instead, for comparison
    residual_bytes_per_token: int  # one rank's share of the residual stream (the whole of it at tp 1)
    decode: str  # what a one-token step runs


def sequence_schedule(
    config: GPTConfig, dtype: torch.dtype, tp: int, stages: Stages, vocab_parallel: bool = False
) -> SequenceSchedule:
    sequence.check_tp(tp)
    scatters, gathers = plan.sequence_collectives(config, stages, vocab_parallel)
    width = config.n_embd * dtype.itemsize
    moved = (
        f"the whole sequence for the output layer, or, generating, its last position: {config.n_embd} x "
        f"{dtype.itemsize} B per position"
    )
    if vocab_parallel:
        what = "each rank looks up the tokens of its vocabulary slice, zeros elsewhere, a piece at a time"
        embed = Step("wte (vocab-parallel)", "column", what)
        summed = Step("REDUCE-SCATTER", "reduce-scatter", "each piece's partial embeddings summed onto its owner")
        before = [embed, summed]
    else:
        before = [Step("wte", "replicated", "every rank looks up its chunk's tokens")]
    before.append(Step("+ wpe", "chunk", "the positions of the chunk"))
    after = [
        Step("ln_f", "chunk", "on the chunk"),
        Step("ALL-GATHER", "all-gather", moved),
        Step("lm_head", "replicated" if not vocab_parallel else "column", "the logits of those positions"),
    ]
    return SequenceSchedule(
        before_blocks=before,
        block=block_flow(config, tp, dtype.itemsize, sequence_parallel=True),
        after_blocks=after,
        pieces=f"between an all-gather and its reduce-scatter a rank computes a piece of at most {PIECE_ROWS} "
        f"positions ({NETWORK_PIECE_ROWS} where gloo or NCCL carries the collectives) at a time, in order "
        "(attention is causal: earlier pieces are in the KV cache): the owner of the piece's chunk broadcasts it, "
        "every rank computes its heads' or units' partial sums, which are reduced onto the owner. No rank holds "
        "the whole sequence's activations, only its chunk and one piece",
        reduce_scatters_per_forward=scatters,
        all_gathers_per_forward=gathers,
        moved_bytes_per_token=(scatters + gathers) * width * (tp - 1) // tp,
        all_reduce_bytes_per_token=plan.sync_points(config, vocab_parallel) * width,
        residual_bytes_per_token=width // tp,
        decode=f"a one-token decode step has nothing to cut: the tensor-parallel schedule, "
        f"{plan.sync_points(config, vocab_parallel)} all-reduces per forward",
    )


# --- a checkpoint ---------------------------------------------------------------------------------


@dataclass
class Optimizer:
    present: bool
    tensors: int = 0
    bytes: int = 0  # its tensors' bytes in the archive (stored uncompressed): sized, never read


@dataclass
class CheckpointReport:
    path: str
    format: str
    file_bytes: int
    model_args: dict
    parameters: int
    dtype: str
    tensor_bytes: int
    iter_num: int | None
    best_val_loss: float | None
    dataset: str | None
    tokenizer: str | None
    tokenizer_note: str | None  # why none was found
    optimizer: Optimizer
    sha256: str | None  # with checksums=True
    plan: SplitPlan
    stages: list[StageFacts] | None = None  # with pp > 1
    sequence: SequenceSchedule | None = None  # with sequence_parallel
    kind: str = "checkpoint"


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors(item)]
    return []


def optimizer_state(path: Path) -> Optimizer:
    """The optimizer entry of a ckpt.pt, sized from its memory-mapped tensors: no byte of it is read."""
    state = read_checkpoint_file(path).get("optimizer")
    if not state:
        return Optimizer(present=False)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(state)}
    return Optimizer(present=True, tensors=len(_tensors(state)), bytes=sum(storages.values()))


def _format(path: Path) -> str:
    formats = {
        Kind.HF_DIRECTORY: "Hugging Face GPT-2 directory",
        Kind.DENSE_SAFETENSORS: "dense safetensors",
        Kind.DCP_DIRECTORY: "PyTorch distributed checkpoint (DCP)",
    }
    return formats.get(kind_of(path), "nanoGPT ckpt.pt")


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _tokenizer(ckpt: Checkpoint) -> tuple[str | None, str | None]:
    dataset = ckpt.train_config.get("dataset")
    try:
        found = find_tokenizer(ckpt.path, dataset=dataset, vocab_size=ckpt.config.vocab_size)
    except TpshardError as e:
        return None, str(e)
    return found.name, None


def inspect_checkpoint(
    path: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    stage_layers: Stages | None = None,
    vocab_parallel: bool = False,
    checksums: bool = False,
    sequence_parallel: bool = False,
) -> CheckpointReport:
    ckpt = load_checkpoint(path)
    split = split_plan(ckpt.config, ckpt.dtype, tp, vocab_parallel)  # refuses a bad tp before anything slow
    stages = None
    chosen = Stages.one(ckpt.config.n_layer)
    if pp > 1 or stage_layers is not None:
        chosen = choose_stages(ckpt.config, pp, stage_layers, tp, vocab_parallel)
        stages = stage_plan(ckpt.config, ckpt.dtype, tp, chosen, vocab_parallel)
    sequence = sequence_schedule(ckpt.config, ckpt.dtype, tp, chosen, vocab_parallel) if sequence_parallel else None
    stored = [t for name, t in ckpt.state_dict.items() if name not in plan.TIED]
    tokenizer, note = _tokenizer(ckpt)
    is_pt = _format(path) == "nanoGPT ckpt.pt"
    dataset = ckpt.train_config.get("dataset")
    return CheckpointReport(
        path=str(path),
        format=_format(path),
        file_bytes=_disk_bytes(path),
        model_args=model_args(ckpt.config),
        parameters=_parameters(ckpt.config),
        dtype=DTYPE_NAMES.get(ckpt.dtype, str(ckpt.dtype)),
        tensor_bytes=sum(t.numel() * t.element_size() for t in stored),
        iter_num=ckpt.iter_num,
        best_val_loss=ckpt.best_val_loss,
        dataset=dataset if isinstance(dataset, str) else None,
        tokenizer=tokenizer,
        tokenizer_note=note,
        optimizer=optimizer_state(path) if is_pt else Optimizer(present=False),
        sha256=sha256_file(path) if checksums and path.is_file() else None,
        plan=split,
        stages=stages,
        sequence=sequence,
    )


# --- a shard set ----------------------------------------------------------------------------------


@dataclass
class RankEntry:
    rank: int
    file: str
    tensors: int
    bytes: int  # the file's size recorded in the manifest
    tensor_bytes: int
    share: float  # tensor_bytes / the dense model's bytes
    sha256: str
    problem: str | None = None  # why the file fails the integrity check


@dataclass
class IntegritySummary:
    files_present: int
    files_expected: int
    sizes_match: bool
    sha256_checked: bool
    ok: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class ShardSetReport:
    path: str
    format_version: int
    tp_size: int
    dtype: str
    vocab_parallel: bool
    model_args: dict
    parameters: int
    dense_bytes: int
    source: dict  # file, sha256, iter_num, best_val_loss, ... as the manifest records them
    tokenizer: str | None
    tokenizer_present: bool
    ranks: list[RankEntry]
    block: list[Branch]
    plan: SplitPlan
    integrity: IntegritySummary
    pp_size: int = 1
    stages: list[StageFacts] | None = None  # with pp > 1
    sequence: SequenceSchedule | None = None  # with sequence_parallel
    kind: str = "shards"


def _check_rank(shards: ShardSet, rank: int, checksums: bool) -> str | None:
    try:
        shards.check_file(rank, checksum=checksums)
    except TpshardError as e:
        return str(e)
    return None


def inspect_shards(path: Path, *, checksums: bool = False, sequence_parallel: bool = False) -> ShardSetReport:
    shards = ShardSet.open(path)
    m = shards.manifest
    split = split_plan(m.config, m.dtype, m.tp_size, m.vocab_parallel)
    dense = m.dense_bytes()
    ranks = []
    for entry in m.files:
        layout = m.layout(entry["rank"])
        tensor_bytes = sum(d.itemsize * _numel(shape) for _, d, shape in layout)
        ranks.append(
            RankEntry(
                rank=entry["rank"],
                file=entry["file"],
                tensors=len(layout),
                bytes=entry["bytes"],
                tensor_bytes=tensor_bytes,
                share=tensor_bytes / dense,
                sha256=entry["sha256"],
                problem=_check_rank(shards, entry["rank"], checksums),
            )
        )
    present = [shards.rank_path(r.rank).is_file() for r in ranks]
    sizes = all(shards.rank_path(r.rank).stat().st_size == r.bytes for r, ok in zip(ranks, present, strict=True) if ok)
    problems = [r.problem for r in ranks if r.problem]
    tokenizer_path = shards.tokenizer_path
    return ShardSetReport(
        path=str(path),
        format_version=m.format_version,
        tp_size=m.tp_size,
        dtype=DTYPE_NAMES[m.dtype],
        vocab_parallel=m.vocab_parallel,
        model_args=model_args(m.config),
        parameters=_parameters(m.config),
        dense_bytes=dense,
        source=m.source,
        tokenizer=m.tokenizer,
        tokenizer_present=tokenizer_path is not None and tokenizer_path.is_file(),
        ranks=ranks,
        block=block_flow(m.config, m.tp_size, m.dtype.itemsize),
        plan=split,
        integrity=IntegritySummary(
            files_present=sum(present),
            files_expected=len(ranks),
            sizes_match=all(present) and sizes,
            sha256_checked=checksums,
            ok=not problems,
            problems=problems,
        ),
        pp_size=m.grid.pp,
        stages=stage_plan(m.config, m.dtype, m.tp_size, m.stage_plan, m.vocab_parallel) if m.grid.pp > 1 else None,
        sequence=sequence_schedule(m.config, m.dtype, m.tp_size, m.stage_plan, m.vocab_parallel)
        if sequence_parallel
        else None,
    )


# --- a lone rank file -----------------------------------------------------------------------------


@dataclass
class StoredTensor:
    name: str
    dtype: str
    shape: list[int]
    bytes: int


@dataclass
class RankFileReport:
    path: str
    rank: int
    tp_size: int
    format_version: str
    file_bytes: int
    tensors: list[StoredTensor]
    tensor_bytes: int
    shard_set: str | None  # the directory whose manifest lists this file as this rank
    sha256: str | None  # with checksums=True
    sha256_matches: bool | None  # against that manifest; None when there is none or no checksum
    pp_size: int = 1
    stage: int = 0  # with pp_size > 1, from the file's metadata
    kind: str = "rank_file"


def inspect_rank_file(path: Path, *, checksums: bool = False) -> RankFileReport:
    identity = rank_file_identity(path)
    if identity is None:
        raise TpshardError(f"{path}: not a tpshard rank file (no tpshard metadata)")
    rank, tp_size, version = identity
    tensors = []
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        pp_size, stage = _metadata_int(meta, "pp_size", 1), _metadata_int(meta, "stage", 0)
        # in file order, as written (nanoGPT's state_dict order); keys() alone is sorted by name
        names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
        for name in names:
            sl = f.get_slice(name)
            dtype, shape = NAMES_BY_CODE.get(sl.get_dtype(), sl.get_dtype()), list(sl.get_shape())
            itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 0
            tensors.append(StoredTensor(name, dtype, shape, itemsize * _numel(shape)))
    listed = _listing(path, rank)
    digest = sha256_file(path) if checksums else None
    return RankFileReport(
        path=str(path),
        rank=rank,
        tp_size=tp_size,
        format_version=version,
        file_bytes=path.stat().st_size,
        tensors=tensors,
        tensor_bytes=sum(t.bytes for t in tensors),
        shard_set=str(path.parent) if listed else None,
        sha256=digest,
        sha256_matches=digest == listed["sha256"] if digest and listed else None,
        pp_size=pp_size,
        stage=stage,
    )


def _metadata_int(meta: dict, key: str, default: int) -> int:
    """A rank file's metadata field as an int (written by tpshard as decimal text; absent before stages)."""
    value = meta.get(key)
    return int(value) if isinstance(value, str) and value.isdigit() else default


def _listing(path: Path, rank: int) -> dict | None:
    """The manifest entry beside the file that lists it as this rank, if any (read as plain JSON: a
    lone rank file is worth describing even when its set's manifest is damaged)."""
    try:
        files = read_manifest(path.parent).get("files", [])  # type: ignore[union-attr]
        return next((e for e in files if e.get("file") == path.name and e.get("rank") == rank), None)
    except (TpshardError, AttributeError, TypeError):
        return None


# --- any path -------------------------------------------------------------------------------------

Report = CheckpointReport | ShardSetReport | RankFileReport


def inspect_path(
    path: str | Path,
    *,
    tp: int | None = None,
    pp: int | None = None,
    stage_layers: Stages | None = None,
    vocab_parallel: bool = False,
    checksums: bool = False,
    sequence_parallel: bool = False,
) -> Report:
    """Whatever is at path: a shard directory, a rank file, or a dense checkpoint (tp, pp and
    stage_layers: how to split it, tp 1 and pp 1 when None; for shards and rank files they must be
    the set's own, if given). sequence_parallel: also the schedule of a sequence-parallel forward."""
    path = Path(path)
    kind = kind_of(path)
    if kind is Kind.MISSING:
        raise TpshardError(f"{path}: no such file or directory")
    if kind is Kind.OTHER_DIRECTORY:
        raise TpshardError(
            f"{path}: neither a shard directory (no {MANIFEST}) nor a Hugging Face GPT-2 directory "
            "(no config.json); give a ckpt.pt, a shard directory or a rank file"
        )
    if kind is Kind.SHARD_SET:
        grid = ShardSet.open(path).manifest.grid
        _already_split(path, grid.tp, tp, vocab_parallel)
        if (pp is not None and pp != grid.pp) or stage_layers is not None:
            raise TpshardError(
                f"--pp/--stage-layers: {path} is already split into {grid.pp} stage(s); reshard it: "
                f"tpshard reshard {path} --tp {grid.tp} --pp P -o OUT"
            )
        return inspect_shards(path, checksums=checksums, sequence_parallel=sequence_parallel)
    if kind is Kind.NANOGPT_OUT_DIR:
        path = checkpoint_file(path)  # described as the ckpt.pt it holds, as sample.py's --out_dir reads it
    if kind is Kind.RANK_FILE:
        identity = rank_file_identity(path)
        assert identity is not None
        _already_split(path, identity[1], tp, vocab_parallel)
        if sequence_parallel:
            raise TpshardError(f"--sequence-parallel: {path} is one rank's file; inspect its directory {path.parent}")
        return inspect_rank_file(path, checksums=checksums)
    return inspect_checkpoint(
        path,
        tp=1 if tp is None else tp,
        pp=pp or (stage_layers.pp if stage_layers else 1),
        stage_layers=stage_layers,
        vocab_parallel=vocab_parallel,
        checksums=checksums,
        sequence_parallel=sequence_parallel,
    )


def _already_split(path: Path, tp_size: int, tp: int | None, vocab_parallel: bool) -> None:
    """--tp and --vocab-parallel describe a split to come; a shard set or rank file has had its own."""
    if tp is not None and tp < 1:
        raise TpshardError(f"--tp {tp}: must be at least 1")
    if tp is not None and tp != tp_size:
        shards = path if path.is_dir() else path.parent
        raise TpshardError(
            f"--tp {tp}: {path} is already split {tp_size} ways; reshard it: tpshard reshard {shards} --tp {tp} -o OUT"
        )
    if vocab_parallel:
        raise TpshardError(f"--vocab-parallel: {path} is already split; its manifest says how")


def to_json(report: Report) -> dict:
    return asdict(report)
