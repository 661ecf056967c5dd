"""The verify report: facts and verdicts as dataclasses of plain values, and its JSON form."""

import math
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass
class Inputs:
    kind: str  # "random" (--random-tokens) or "prompt"
    sequences: int
    tokens: list[int]  # per sequence
    new_tokens: int  # greedy tokens generated after each sequence's context
    context: list[int]  # per sequence: tokens the greedy decoding starts from (room left for the new ones)
    seed: int | None = None  # random tokens only
    prompts: list[str] = field(default_factory=list)


@dataclass
class Compared:
    shards: str
    mode: str
    against: str | None
    reference: str  # what the dense side is
    tp_size: int | None = None  # None: the manifest could not be read
    pp_size: int | None = None
    stage_layers: list[int] | None = None  # blocks per stage
    comm: str | None = None  # what carried the distributed run's collectives
    sequence_parallel: bool = False  # the sharded run's forwards of more than one token cut along the sequence
    dtype: str | None = None
    vocab_parallel: bool | None = None
    model_args: dict | None = None
    inputs: Inputs | None = None


@dataclass
class FileCheck:
    rank: int
    file: str
    status: str  # ok, missing, unreadable (a link loop, a directory, no permission), wrong size, wrong rank,
    # bad header, corrupt
    expected_bytes: int
    bytes: int | None = None  # on disk; None when missing
    sha256_matches: bool | None = None  # None: not computed (missing, or of the wrong size)
    holds_rank: int | None = None  # what the file's own metadata says, when readable
    problem: str | None = None
    damaged_tensors: list[str] = field(default_factory=list)  # tensors found to hold the bad bytes
    first_bad_byte: int | None = None  # file offset of the first differing element found
    located_by: str | None = None  # how the damaged tensors were found, or why they could not be


@dataclass
class MergeCheck:
    """Every tensor merged back from the rank files, compared bit for bit with the reference."""

    against: str
    tensors: int = 0
    identical: int = 0
    first_difference: str | None = None  # the first tensor that differs, with the element
    cast: str | None = None  # the reference's dtype cast to the shards' before comparing
    source_sha256_matches: bool | None = None  # the reference file against the manifest's record of its source
    source_file: str | None = None  # the file that was hashed (an out_dir's ckpt.pt, an HF directory's weights)
    problem: str | None = None  # why the comparison could not run or failed


@dataclass
class Integrity:
    passed: bool
    manifest_ok: bool
    format_version: int | None = None
    files: list[FileCheck] = field(default_factory=list)
    merge: MergeCheck | None = None
    tokenizer: str | None = None  # the file the manifest names; None: the set ships none
    tokenizer_status: str | None = None  # "ok" (present, and loads), or what is wrong with it
    problems: list[str] = field(default_factory=list)


@dataclass
class LayerError:
    name: str  # "embedding", "block 0", ...
    max_abs: float
    mean_abs: float
    dense_max_abs: float  # the scale of the dense residual stream there
    # values NaN or infinite on each side (the figures above are over those finite on both)
    dense_nonfinite: int = 0
    sharded_nonfinite: int = 0


@dataclass
class NonFinite:
    """The NaN and infinite logits of one side of the comparison."""

    values: int  # logits NaN or infinite
    nan: int  # of those, NaN
    positions: int  # positions (sequence, token) with at least one
    first_sequence: int  # the first such position
    first_token: int


@dataclass
class Greedy:
    sequences: int
    new_tokens: int
    matched: int  # sequences whose new tokens are all identical
    first_divergence: list[int | None]  # per sequence: the first new token where dense and sharded part
    gap_at_divergence: list[float | None]  # the dense top-2 logit gap at that step
    exact_required: bool  # float32/64: any divergence fails; half precision: only one away from a near tie
    passed: bool


@dataclass
class Numerics:
    passed: bool
    skipped: str | None = None
    atol: float | None = None
    rtol: float | None = None
    tolerance_source: str | None = None  # "default for float32", "given"
    layers: list[LayerError] = field(default_factory=list)
    positions: int = 0
    # NaN or infinite logits: a failure, on whichever side (None: all finite)
    dense_nonfinite: NonFinite | None = None
    sharded_nonfinite: NonFinite | None = None
    finite_positions: int | None = None  # positions finite on both sides: the figures below are over these
    logits_max_abs: float | None = None
    logits_max_rel: float | None = None  # max abs diff / max |dense logit|
    logits_outside: int | None = None  # elements not within atol + rtol * |dense| (NaN, infinities included)
    logits_total: int | None = None
    kl_mean: float | None = None  # KL(dense || sharded) per position, float64
    kl_max: float | None = None
    top1_agreement: float | None = None
    top5_agreement: float | None = None  # the same set of top 5 tokens
    decisive_positions: int | None = None  # dense top-2 gap > 2 * (atol + rtol * |top-1|)
    decisive_disagreements: int | None = None  # top-1 differs at one of those
    greedy: Greedy | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Communication:
    passed: bool
    skipped: str | None = None
    sync_points_theory: int | None = None  # per forward
    theory: str | None = None  # where the theory's numbers come from
    sync_points_measured: list[int] = field(default_factory=list)  # the distinct counts seen per forward
    forwards: int = 0
    bytes_per_token_theory: int | None = None
    bytes_per_token_measured: float | None = None
    # --sequence-parallel: its forwards (more than one token; the ones above are the one-token steps)
    sequence_parallel: bool = False
    sequence_forwards: int = 0
    sequence_theory: str | None = None
    scatters_theory: int | None = None  # reduce-scatters per forward
    scatters_measured: list[int] = field(default_factory=list)  # the distinct counts seen per forward
    gathers_theory: int | None = None  # all-gathers per forward
    gathers_measured: list[int] = field(default_factory=list)
    sequence_bytes_theory: int | None = None  # of the activations they span, over every such forward
    sequence_bytes_measured: int | None = None
    received_bytes_theory: int | None = None  # distributed: what the ranks received in them, summed over the ranks
    received_bytes_measured: int | None = None
    # with pipeline stages: (reductions, reduce-scatters, all-gathers) per stage in the first batch's full
    # forward (every batch's is checked), and the hand-overs
    stage_collectives_theory: list[tuple[int, int, int]] = field(default_factory=list)
    stage_collectives_measured: list[tuple[int, int, int]] = field(default_factory=list)
    sends_theory: int | None = None  # per forward, per tensor-parallel rank
    sends_measured: list[int] = field(default_factory=list)  # the distinct counts seen per forward
    sent_bytes_per_token_theory: float | None = None
    sent_bytes_per_token_measured: float | None = None
    note: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Oracle:
    """verify --oracle torch: the same weights through PyTorch's own tensor parallelism (parallelize_module on
    a reference nanoGPT, loaded from a DCP export), its logits held against the sharded and the dense run."""

    passed: bool
    skipped: str | None = None
    oracle: str = "torch"
    torch_version: str | None = None
    processes: int | None = None
    backend: str | None = None  # "gloo" (CPU) or "nccl"
    plan: dict[str, str] = field(default_factory=dict)  # module -> PyTorch's parallel style, as applied
    atol: float | None = None
    rtol: float | None = None  # times |the other side's logit|: torch's against the sharded run, dense's against torch
    logits_total: int | None = None
    vs_sharded_max_abs: float | None = None  # torch's logits against tpshard's sharded run
    vs_sharded_outside: int | None = None
    vs_dense_max_abs: float | None = None  # torch's logits against the dense model
    vs_dense_outside: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    passed: bool
    summary: str  # one line: why it passed or failed
    compared: Compared
    integrity: Integrity
    numerics: Numerics
    communication: Communication
    oracle: Oracle | None = None  # only with --oracle
    schema_version: int = SCHEMA_VERSION


def to_json(report: Report) -> dict:
    """The report as JSON data; a NaN or infinite figure (a greedy gap on NaN logits) as null, since JSON
    has no such numbers (json.dumps would write NaN, which strict parsers refuse)."""
    data = _finite(asdict(report))
    return {"schema_version": data.pop("schema_version"), "passed": data.pop("passed"), **data}


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
