"""`tpshard verify`: proof that a shard set is its dense model, as facts and verdicts (dataclasses of
plain values; the CLI renders them, or prints them as JSON).

Three parts, each with its own verdict:

    integrity       the manifest; every rank file's presence, size, sha256, safetensors header and
                    rank metadata; with a reference checkpoint, every tensor merged back bit for bit.
                    A damaged file is named, and so is the tensor holding the damage where it can be
                    found: against the reference's piece, or else against another rank's replica.
    numerics        dense vs sharded on the same tokens: the residual stream at every block boundary,
                    the logits (within atol + rtol * |dense|), KL, top-1/top-5 agreement, and greedy
                    decoding through the KV cache. Skipped when integrity fails.
    communication   reductions per forward and bytes per token, counted by CountingReduce, against
                    the theory (2 per block, plus the embedding's when the vocabulary is split).

Both models compute in the shard set's dtype: a bfloat16 set is compared with its dense model in
bfloat16 (the reference checkpoint cast to it), so the numbers show what tensor parallelism changes,
not what the cast to bfloat16 did. The sharded side comes from `sharded_traces`, which runs the same
`trace` in one process (simulated) or in one process per rank (distributed).
"""

import json
import math
import struct
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from tpshard import plan, runtime
from tpshard.checkpoint import Checkpoint, load_checkpoint
from tpshard.errors import TpshardError
from tpshard.generate import Sampling, TokenPicker, generate
from tpshard.model import GPT
from tpshard.shards import DTYPE_NAMES, MANIFEST, ShardSet, open_rank_file, sha256_file

SCHEMA_VERSION = 1
MODES = ("simulated", "distributed")
DEFAULT_BATCH = 4
DEFAULT_NEW_TOKENS = 32
MAX_RANDOM_TOKENS = 64

# (atol, rtol) on the logits. Measured (tpshard verify, random tokens, batch 4 x 64), as max abs diff
# of the logits between the sharded and the dense model in the same dtype:
#   float32   shakespeare_char tp 2/4 and shakespeare_bpe tp 2/3/6: 4.3e-6..5.3e-6 (|logits| <= 12);
#             random GPT-2 124M (12 x 768) tp 2/12: 2.2e-6 (|logits| <= 3); relative to the largest
#             logit, 4e-7..7e-7 everywhere. atol 1e-4 is 20x that, rtol 1e-5 another 15x on large logits.
#   bfloat16  0.0625 on the sample models (one bf16 ulp at |logit| 8..16), 0.039 on random GPT-2 124M
#             (2.5 ulps at 2..4): atol 0.25 and rtol 0.02 (5 ulps of relative precision 2^-8).
#   float16   0.0078 on the sample models (one fp16 ulp at 8..16): atol 0.03, rtol 0.003.
#   float64   1e-15 relative: atol 1e-10, rtol 1e-10.
DEFAULT_TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (0.25, 0.02),
    torch.float16: (0.03, 0.003),
    torch.float64: (1e-10, 1e-10),
}
EXACT_GREEDY = (torch.float32, torch.float64)  # half precision: a greedy split at a near tie is allowed

if TYPE_CHECKING:
    from tpshard.launch import Group

Progress = Callable[[str], None]


# --- the report --------------------------------------------------------------------------------------


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


# --- the entry point ---------------------------------------------------------------------------------


def verify_shards(
    shards_dir: str | Path,
    *,
    against: str | Path | None = None,
    mode: str = "simulated",
    prompts: list[str] | None = None,
    random_tokens: int | None = None,
    batch: int | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
) -> Report:
    """Verify a shard set. Raises TpshardError only when verification cannot run (no such directory,
    no manifest, an unreadable reference, bad options); a damaged shard set is a failed Report."""
    say = progress or (lambda _: None)
    if mode not in MODES:
        raise TpshardError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    _check_options(prompts, random_tokens, batch, new_tokens, atol, rtol)
    shards, manifest_problem = _open(Path(shards_dir))
    reference = load_checkpoint(against) if against is not None else None
    compared = Compared(
        shards=str(shards_dir),
        mode=mode,
        against=str(against) if against is not None else None,
        reference="the --against checkpoint" if reference else "the shard set merged in memory",
    )
    if shards is None:
        integrity = Integrity(passed=False, manifest_ok=False, problems=[f"manifest: {manifest_problem}"])
        return _finish(compared, integrity, None, None)
    m = shards.manifest
    compared.tp_size, compared.dtype, compared.vocab_parallel = m.tp_size, DTYPE_NAMES[m.dtype], m.vocab_parallel
    compared.model_args = asdict(m.config)
    batches, compared.inputs = _inputs(shards, prompts, random_tokens, batch, new_tokens, seed, tokenizer)
    say("checking the rank files")
    integrity = check_integrity(shards, reference, against)
    if not integrity.passed:
        return _finish(compared, integrity, None, None)
    tol = _tolerance(m.dtype, atol, rtol)
    say("running the dense model")
    # integrity has just checked every rank file's sha256: the models below need not hash them again
    dense = reference.model(dtype=m.dtype) if reference else runtime.dense_model(shards, checksum=False)
    contexts = [greedy_context(idx.size(1), m.config.block_size, new_tokens) for idx in batches]
    dense_traces = [trace(dense, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)]
    del dense
    say(f"running the sharded model ({mode})")
    sharded = sharded_traces(shards, batches, contexts, new_tokens, mode)
    numerics = compare(dense_traces, sharded, tol, m.dtype)
    communication = count_communication(sharded, shards, mode)
    return _finish(compared, integrity, numerics, communication)


def _check_options(
    prompts: list[str] | None,
    random_tokens: int | None,
    batch: int | None,
    new_tokens: int,
    atol: float | None,
    rtol: float | None,
) -> None:
    if prompts and random_tokens is not None:
        raise TpshardError("--prompt and --random-tokens both given; choose one")
    if prompts and batch is not None:
        raise TpshardError("--batch sets the number of random sequences; with --prompt, give one --prompt per sequence")
    if batch is not None and batch < 1:
        raise TpshardError(f"--batch {batch}: must be at least 1")
    if random_tokens is not None and random_tokens < 1:
        raise TpshardError(f"--random-tokens {random_tokens}: must be at least 1")
    if new_tokens < 0:
        raise TpshardError(f"--tokens {new_tokens}: must be 0 or more")
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise TpshardError(f"{name} {value}: must be a finite number, 0 or more")


def _open(directory: Path) -> tuple[ShardSet | None, str | None]:
    """The shard set, or (None, why) when its manifest is damaged. No directory or no manifest at all
    is not a shard set to verify: that raises."""
    if not directory.is_dir():
        why = "not a directory" if directory.exists() else "no such directory"
        raise TpshardError(f"{directory}: {why}")
    if not (directory / MANIFEST).is_file():
        raise TpshardError(f"{directory}: no {MANIFEST}; is this the output of tpshard split?")
    try:
        return ShardSet.open(directory), None
    except TpshardError as e:
        return None, str(e)


def _tolerance(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float, str]:
    default_atol, default_rtol = DEFAULT_TOLERANCES[dtype]
    given = [name for name, value in (("atol", atol), ("rtol", rtol)) if value is not None]
    source = f"default for {DTYPE_NAMES[dtype]}" if not given else f"{' and '.join(given)} given"
    if len(given) == 1:
        source += f", {'rtol' if atol is not None else 'atol'} default for {DTYPE_NAMES[dtype]}"
    return (default_atol if atol is None else atol), (default_rtol if rtol is None else rtol), source


def _finish(
    compared: Compared, integrity: Integrity, numerics: Numerics | None, communication: Communication | None
) -> Report:
    why = "integrity failed" if integrity.manifest_ok else "the manifest is unreadable"
    numerics = numerics or Numerics(passed=False, skipped=f"skipped: {why}")
    communication = communication or Communication(passed=False, skipped=f"skipped: {why}")
    parts = {"integrity": integrity, "numerics": numerics, "communication": communication}
    passed = all(part.passed for part in parts.values())
    if passed:
        summary = "integrity, numerics and communication all hold"
    else:
        failed = [f"{name}: {part.problems[0]}" for name, part in parts.items() if part.problems]
        more = sum(len(part.problems) for part in parts.values()) - len(failed)
        summary = "; ".join(failed) + (f" (and {more} more)" if more else "")
        if integrity.passed is False:
            summary += "; numerics and communication skipped"
    return Report(passed, summary, compared, integrity, numerics, communication)


# --- inputs ------------------------------------------------------------------------------------------


def _inputs(
    shards: ShardSet,
    prompts: list[str] | None,
    random_tokens: int | None,
    batch: int | None,
    new_tokens: int,
    seed: int,
    tokenizer_file: str | Path | None,
) -> tuple[list[torch.Tensor], Inputs]:
    """The token batches: B random sequences of T tokens as one batch, or each prompt as a batch of
    its own (prompts differ in length). Greedy decoding starts from a prefix short enough that the
    new tokens fit in block_size, so that every step goes through the KV cache."""
    config = shards.manifest.config
    if prompts:
        from tpshard.tokenizer import find_tokenizer

        dataset = (shards.manifest.source.get("config") or {}).get("dataset")
        tokenizer = find_tokenizer(
            shards.directory, dataset=dataset, vocab_size=config.vocab_size, explicit=tokenizer_file
        )
        encoded = [tokenizer.encode(text)[-config.block_size :] for text in prompts]
        if not all(encoded):
            raise TpshardError("--prompt: an empty prompt; give at least one character")
        batches = [torch.tensor([ids]) for ids in encoded]
    else:
        length = random_tokens or min(MAX_RANDOM_TOKENS, config.block_size)
        if length > config.block_size:
            raise TpshardError(f"--random-tokens {length}: more than the model's block_size {config.block_size}")
        gen = torch.Generator().manual_seed(seed)
        batches = [torch.randint(config.vocab_size, (batch or DEFAULT_BATCH, length), generator=gen)]
    inputs = Inputs(
        kind="prompt" if prompts else "random",
        sequences=sum(b.size(0) for b in batches),
        tokens=[b.size(1) for b in batches for _ in range(b.size(0))],
        new_tokens=new_tokens,
        context=[greedy_context(b.size(1), config.block_size, new_tokens) for b in batches for _ in range(b.size(0))],
        seed=None if prompts else seed,
        prompts=list(prompts or []),
    )
    return batches, inputs


def greedy_context(tokens: int, block_size: int, new_tokens: int) -> int:
    """The prefix greedy decoding continues: short enough for the new tokens to fit in block_size."""
    return max(1, min(tokens, block_size - new_tokens))


# --- integrity ---------------------------------------------------------------------------------------


def check_integrity(shards: ShardSet, reference: Checkpoint | None, against: str | Path | None) -> Integrity:
    """Every rank file checked (none skipped because another failed), then the damage located and,
    with a reference, the merge compared bit for bit."""
    files = [_check_file(shards, rank) for rank in range(shards.tp_size)]
    usable = reference is not None and _same_model(shards, reference) is None
    for check in files:
        if check.status == "corrupt":
            _locate_damage(shards, check, files, reference if usable else None)
    merge = _check_merge(shards, reference, against, files) if reference is not None else None
    problems = [f"{c.file}: {c.problem}" + _damage_note(c) for c in files if c.status != "ok"]
    if merge is not None and merge.problem:
        problems.append(f"merge vs {Path(merge.against).name}: {merge.problem}")
    return Integrity(
        passed=not problems,
        manifest_ok=True,
        format_version=shards.manifest.format_version,
        files=files,
        merge=merge,
        problems=problems,
    )


def _damage_note(check: FileCheck) -> str:
    if check.damaged_tensors:
        return f" (damaged tensor: {check.damaged_tensors[0]})"
    return ""


def _check_file(shards: ShardSet, rank: int) -> FileCheck:
    entry, path = shards.manifest.files[rank], shards.rank_path(rank)
    check = FileCheck(rank=rank, file=entry["file"], status="ok", expected_bytes=entry["bytes"])
    if not path.is_file():
        check.status, check.problem = "missing", "the file is missing"
        return check
    check.bytes = path.stat().st_size
    check.holds_rank = _holds_rank(path)
    try:  # size, safetensors header, tensor names, shapes and dtypes, rank / tp metadata
        shards.check_file(rank, checksum=False)
    except TpshardError as e:
        check.problem = str(e).removeprefix(f"{path}: ")
        if check.bytes != check.expected_bytes:
            check.status = "wrong size"
        elif check.holds_rank is not None and check.holds_rank != rank:
            check.status = "wrong rank"
        else:
            check.status = "bad header"
    if check.bytes == check.expected_bytes:
        check.sha256_matches = sha256_file(path) == entry["sha256"]
        if not check.sha256_matches and check.status == "ok":
            check.status, check.problem = "corrupt", "sha256 differs from the manifest's"
    return check


def _holds_rank(path: Path) -> int | None:
    try:
        with open_rank_file(path) as f:
            return int((f.metadata() or {})["rank"])
    except (TpshardError, KeyError, ValueError):
        return None


def _locate_damage(shards: ShardSet, check: FileCheck, files: list[FileCheck], reference: Checkpoint | None) -> None:
    """Which tensor holds the bad bytes: compare the file's tensors with the reference's pieces, or
    else its replicated tensors with an intact rank's copies (split tensors have nothing to compare to)."""
    m, rank = shards.manifest, check.rank
    if reference is not None:
        names = list(m.tensors)
        expected = lambda name: plan.shard(name, reference.state_dict[name], rank, m.tp_size, m.vocab_parallel)  # noqa: E731
        check.located_by = "compared with the --against checkpoint's piece for this rank"
    else:
        intact = next((c.rank for c in files if c.status == "ok"), None)
        if intact is None:
            check.located_by = "not located: no intact rank to compare with; pass --against CKPT to name the tensor"
            return
        names = [n for n in m.tensors if plan.rule_for(n, m.vocab_parallel) is plan.Rule.REPLICATED]
        with open_rank_file(shards.rank_path(intact)) as f:
            replicas = {name: f.get_tensor(name) for name in names}
        expected = replicas.__getitem__
        check.located_by = f"replicated tensors compared with rank {intact}'s copies"
    offsets = _data_offsets(shards.rank_path(rank))
    with open_rank_file(shards.rank_path(rank)) as f:
        for name in names:
            stored = f.get_tensor(name)
            byte = first_different_byte(stored, expected(name).to(m.dtype))
            if byte is None:
                continue
            check.damaged_tensors.append(name)
            if check.first_bad_byte is None and name in offsets:
                check.first_bad_byte = offsets[name] + byte
    if not check.damaged_tensors:
        check.located_by = (
            "not located: every replicated tensor matches; the damage is in a split tensor or the header "
            "(pass --against CKPT to name the tensor)"
            if reference is None
            else "not located: every tensor matches the reference; the damage is outside the tensor data"
        )


def _data_offsets(path: Path) -> dict[str, int]:
    """Each tensor's first byte in a safetensors file (8-byte header length, JSON header, data)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, path.stat().st_size)))
        return {name: 8 + length + t["data_offsets"][0] for name, t in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return {}


def first_different_byte(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Offset of the first byte where two tensors' data differ (bits, so NaN == NaN and -0.0 != 0.0);
    None when they are identical."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 0
    differ = (a.contiguous().view(torch.uint8).flatten() != b.contiguous().view(torch.uint8).flatten()).nonzero()
    return int(differ[0]) if len(differ) else None


def _same_model(shards: ShardSet, reference: Checkpoint) -> str | None:
    """Why the reference cannot be this shard set's model, or None."""
    ours, theirs = asdict(shards.manifest.config), asdict(reference.config)
    differ = [f"{k} {theirs[k]} vs the shards' {ours[k]}" for k in ours if k != "dropout" and ours[k] != theirs[k]]
    return f"not this shard set's model: model_args differ ({', '.join(differ)})" if differ else None


def _check_merge(
    shards: ShardSet, reference: Checkpoint, against: str | Path | None, files: list[FileCheck]
) -> MergeCheck:
    m = shards.manifest
    merge = MergeCheck(against=str(against))
    if reference.dtype != m.dtype:
        merge.cast = f"the reference's {DTYPE_NAMES.get(reference.dtype)} cast to {DTYPE_NAMES[m.dtype]}"
    recorded = m.source.get("sha256")
    if recorded and Path(against).is_file() and Path(against).name == m.source.get("file"):
        merge.source_sha256_matches = sha256_file(Path(against)) == recorded
    merge.problem = _same_model(shards, reference)
    if merge.problem:
        return merge
    unreadable = [c.file for c in files if c.status not in ("ok", "corrupt")]
    if unreadable:
        merge.problem = f"not compared: {', '.join(unreadable)} cannot be read as this set's rank files"
        return merge
    pieces = shards.load_pieces(list(range(m.tp_size)), checksum=False)
    for name, ranks in pieces.items():
        merge.tensors += 1
        byte = first_different_byte(m.unshard(name, ranks), reference.state_dict[name].to(m.dtype))
        if byte is None:
            merge.identical += 1
        elif merge.first_difference is None:
            merge.first_difference = f"{name} (flat element {byte // m.dtype.itemsize})"
    if merge.first_difference:
        differing = merge.tensors - merge.identical
        merge.problem = f"{differing} tensor(s) differ from the reference, first {merge.first_difference}"
    return merge


# --- running the models ------------------------------------------------------------------------------


@dataclass
class Trace:
    """What one model computed on one batch: the sharded side of a comparison, from any runtime."""

    hidden: list[torch.Tensor]  # the residual stream after the embedding and after each block [B, T, C]
    logits: torch.Tensor  # [B, T, V]
    tokens: torch.Tensor  # [B, K] greedy continuation of the context, through the KV cache
    top2: torch.Tensor  # [B, K, 2] the two largest logits each greedy token was picked from
    forwards: list[tuple[int, int, int]]  # per forward: reductions, bytes reduced, tokens in


@torch.inference_mode()
def trace(
    model: GPT,
    idx: torch.Tensor,
    context: int,
    new_tokens: int,
    share: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Trace:
    """Run idx (B, T) through model: one full forward with every hidden state, then greedy decoding
    of new_tokens after the first `context` tokens. share: how a distributed rank makes every rank
    take rank 0's token (group.broadcast)."""
    forwards: list[tuple[int, int, int]] = []
    counter = model.reduce if isinstance(model.reduce, runtime.CountingReduce) else runtime.CountingReduce()
    before = model.register_forward_pre_hook(lambda _, args: forwards.append((counter.calls, counter.bytes, 0)))

    def after(_module: GPT, args: tuple, _output: torch.Tensor) -> None:
        calls, sent, _ = forwards[-1]
        forwards[-1] = (counter.calls - calls, counter.bytes - sent, args[0].numel())

    hooks = [before, model.register_forward_hook(after)]
    try:
        hidden: list[torch.Tensor] = []
        logits = model(idx, hidden_states=hidden)
        tokens, top2 = _greedy(model, idx[:, :context], new_tokens, share)
    finally:
        for hook in hooks:
            hook.remove()
    return Trace(hidden, logits, tokens, top2, forwards)


def _greedy(
    model: GPT, idx: torch.Tensor, new_tokens: int, share: Callable[[torch.Tensor], torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    picker = TokenPicker(Sampling(greedy=True))
    top2: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top2.append(logits.float().topk(min(2, logits.size(-1))).values)
        token = picker(logits)
        return share(token) if share else token

    tokens = list(generate(model, idx, new_tokens, pick))
    B = idx.size(0)
    if not tokens:
        return torch.empty(B, 0, dtype=torch.long), torch.empty(B, 0, 2)
    return torch.stack(tokens, 1), torch.stack(top2, 1)


def sharded_traces(
    shards: ShardSet, batches: list[torch.Tensor], contexts: list[int], new_tokens: int, mode: str
) -> list[Trace]:
    """The sharded model's traces of every batch: all ranks in this process (simulated), or one
    process per rank (distributed; rank 0's traces, identical on every rank, come back). The rank
    files' sha256 are not checked again: verify's integrity part has just done it."""
    if mode == "simulated":
        model = runtime.simulated_model(shards, checksum=False)
        return [trace(model, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)]
    from tpshard import launch

    if launch.started_by_torchrun():
        raise TpshardError("verify --mode distributed starts its own ranks; run it without torchrun")
    with tempfile.TemporaryDirectory(prefix="tpshard-verify-") as tmp:
        out = Path(tmp, "traces.pt")
        args = (shards, batches, contexts, new_tokens, str(out))
        launch.run(_rank_traces, args, nproc=shards.tp_size, device="cpu")
        saved = torch.load(out, weights_only=True)
    return [Trace(**t) for t in saved]


def _rank_traces(
    group: "Group", shards: ShardSet, batches: list[torch.Tensor], contexts: list[int], new_tokens: int, out: str
) -> None:
    """One rank of a distributed verify: its own shard file only; rank 0 saves the traces."""
    model = runtime.distributed_model(shards, group, checksum=False)
    pairs = zip(batches, contexts, strict=True)
    traces = [trace(model, idx, ctx, new_tokens, group.broadcast) for idx, ctx in pairs]
    if group.rank == 0:
        torch.save([vars(t) for t in traces], out)


# --- numerics ----------------------------------------------------------------------------------------


def compare(
    dense: list[Trace], sharded: list[Trace], tolerance: tuple[float, float, str], dtype: torch.dtype
) -> Numerics:
    """Every fact of the numerics part, computed in float64 over all batches."""
    atol, rtol, source = tolerance
    result = Numerics(passed=False, atol=atol, rtol=rtol, tolerance_source=source)
    result.layers = _layer_errors(dense, sharded)
    d = torch.cat([t.logits.double().flatten(0, 1) for t in dense])  # [positions, V]
    s = torch.cat([t.logits.double().flatten(0, 1) for t in sharded])
    diff = (s - d).abs()
    result.positions, result.logits_total = d.size(0), d.numel()
    result.logits_max_abs = float(diff.max())
    result.logits_max_rel = float(diff.max() / d.abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    result.logits_outside = int((diff > atol + rtol * d.abs()).sum())
    log_d, log_s = F.log_softmax(d, -1), F.log_softmax(s, -1)
    kl = (log_d.exp() * (log_d - log_s)).sum(-1)
    result.kl_mean, result.kl_max = float(kl.mean()), float(kl.max())
    top1_same = d.argmax(-1) == s.argmax(-1)
    result.top1_agreement = float(top1_same.double().mean())
    k = min(5, d.size(-1))
    top5_d, top5_s = d.topk(k).indices.sort(-1).values, s.topk(k).indices.sort(-1).values
    result.top5_agreement = float((top5_d == top5_s).all(-1).double().mean())
    decisive = _decisive(d.topk(min(2, d.size(-1))).values, atol, rtol)
    result.decisive_positions = int(decisive.sum())
    result.decisive_disagreements = int((decisive & ~top1_same).sum())
    result.greedy = _compare_greedy(dense, sharded, atol, rtol, dtype)
    result.problems = _numeric_problems(result)
    result.passed = not result.problems
    return result


def _decisive(top2: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Where the dense top-2 gap exceeds twice the tolerance: logits within tolerance cannot swap the
    top two there, so the top-1 token must agree."""
    if top2.size(-1) < 2:
        return torch.ones(top2.shape[:-1], dtype=torch.bool)
    return top2[..., 0] - top2[..., 1] > 2 * (atol + rtol * top2[..., 0].abs())


def _layer_errors(dense: list[Trace], sharded: list[Trace]) -> list[LayerError]:
    layers = []
    for i in range(len(dense[0].hidden)):
        d = torch.cat([t.hidden[i].double().flatten() for t in dense])
        diff = (torch.cat([t.hidden[i].double().flatten() for t in sharded]) - d).abs()
        name = "embedding" if i == 0 else f"block {i - 1}"
        layers.append(LayerError(name, float(diff.max()), float(diff.mean()), float(d.abs().max())))
    return layers


def _compare_greedy(
    dense: list[Trace], sharded: list[Trace], atol: float, rtol: float, dtype: torch.dtype
) -> Greedy | None:
    if dense[0].tokens.size(1) == 0:
        return None
    exact = dtype in EXACT_GREEDY
    firsts: list[int | None] = []
    gaps: list[float | None] = []
    passed = True
    for d, s in zip(dense, sharded, strict=True):
        for row in range(d.tokens.size(0)):
            differ = (d.tokens[row] != s.tokens[row]).nonzero()
            if not len(differ):
                firsts.append(None)
                gaps.append(None)
                continue
            step = int(differ[0])
            top2 = d.top2[row, step].double()
            firsts.append(step)
            gaps.append(float(top2[0] - top2[-1]))
            passed = passed and not exact and bool(~_decisive(top2, atol, rtol))
    return Greedy(
        sequences=len(firsts),
        new_tokens=dense[0].tokens.size(1),
        matched=firsts.count(None),
        first_divergence=firsts,
        gap_at_divergence=gaps,
        exact_required=exact,
        passed=passed,
    )


def _numeric_problems(r: Numerics) -> list[str]:
    problems = []
    if r.logits_outside:
        problems.append(
            f"{r.logits_outside:,} of {r.logits_total:,} logits outside atol {r.atol:g} + rtol {r.rtol:g}·|dense| "
            f"(max abs diff {r.logits_max_abs:.3g})"
        )
    if r.decisive_disagreements:
        problems.append(
            f"top-1 token differs at {r.decisive_disagreements} of {r.decisive_positions} positions where the "
            "dense top-2 gap exceeds twice the tolerance"
        )
    g = r.greedy
    if g is not None and not g.passed:
        parted = [(i, step) for i, step in enumerate(g.first_divergence) if step is not None]
        i, step = parted[0]
        rule = "must match exactly in this dtype" if g.exact_required else "parted away from a near tie"
        problems.append(
            f"greedy decoding parts in {len(parted)} of {g.sequences} sequences ({rule}): sequence {i} at "
            f"new token {step}, dense top-2 gap {g.gap_at_divergence[i]:.3g}"
        )
    return problems


# --- communication -----------------------------------------------------------------------------------


def count_communication(sharded: list[Trace], shards: ShardSet, mode: str) -> Communication:
    """Reductions counted in every forward of the sharded runs, against plan.sync_points."""
    m = shards.manifest
    theory = plan.sync_points(m.config, m.vocab_parallel)
    per_token = theory * m.config.n_embd * m.dtype.itemsize
    forwards = [f for t in sharded for f in t.forwards]
    tokens = sum(f[2] for f in forwards)
    why = f"2 per block (after attention, after the MLP) × {m.config.n_layer} blocks"
    why += " + 1 (the vocab-parallel embedding)" if m.vocab_parallel else ""
    why += f"; bytes per token = {theory} × n_embd {m.config.n_embd} × {m.dtype.itemsize} B"
    result = Communication(
        passed=False,
        sync_points_theory=theory,
        theory=why,
        sync_points_measured=sorted({f[0] for f in forwards}),
        forwards=len(forwards),
        bytes_per_token_theory=per_token,
        bytes_per_token_measured=sum(f[1] for f in forwards) / tokens if tokens else 0.0,
        note=_gather_note(m.vocab_parallel, mode),
    )
    if result.sync_points_measured != [theory]:
        seen = ", ".join(map(str, result.sync_points_measured))
        result.problems.append(f"{seen} reductions per forward measured, theory says {theory}")
    if result.bytes_per_token_measured != per_token:
        result.problems.append(f"{result.bytes_per_token_measured:g} bytes per token reduced, theory says {per_token}")
    result.passed = not result.problems
    return result


def _gather_note(vocab_parallel: bool, mode: str) -> str | None:
    if mode == "distributed":
        return "plus one all-gather of the vocabulary-sliced logits per forward (not a reduction, not counted)"
    if vocab_parallel:
        return "distributed, a vocab-parallel set also all-gathers its logits once per forward (not counted)"
    return None
