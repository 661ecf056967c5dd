"""The verify report: facts and verdicts as dataclasses of plain values, and its JSON form."""

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
    dtype: str | None = None
    vocab_parallel: bool | None = None
    model_args: dict | None = None
    inputs: Inputs | None = None


@dataclass
class FileCheck:
    rank: int
    file: str
    status: str  # ok, missing, wrong size, wrong rank, bad header, corrupt
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
    problems: list[str] = field(default_factory=list)


@dataclass
class LayerError:
    name: str  # "embedding", "block 0", ...
    max_abs: float
    mean_abs: float
    dense_max_abs: float  # the scale of the dense residual stream there


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
    logits_max_abs: float | None = None
    logits_max_rel: float | None = None  # max abs diff / max |dense logit|
    logits_outside: int | None = None  # elements with |sharded - dense| > atol + rtol * |dense|
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
    note: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    passed: bool
    summary: str  # one line: why it passed or failed
    compared: Compared
    integrity: Integrity
    numerics: Numerics
    communication: Communication
    schema_version: int = SCHEMA_VERSION


def to_json(report: Report) -> dict:
    data = asdict(report)
    return {"schema_version": data.pop("schema_version"), "passed": data.pop("passed"), **data}
