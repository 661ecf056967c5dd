"""The entry point of verify: options checked, inputs drawn, the three parts run in order."""

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from tpshard.errors import TpshardError
from tpshard.files.atomic import input_files, refuse_output_over_inputs
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.paths import Kind, kind_of, load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.files.tensorfile import DTYPE_NAMES
from tpshard.generation import check_seed
from tpshard.parallel import sequence
from tpshard.runtime import streamed
from tpshard.runtime.programs import sharded_traces, trace
from tpshard.verify.communication import count_communication
from tpshard.verify.integrity import check_integrity
from tpshard.verify.numerics import compare
from tpshard.verify.oracle import ORACLES
from tpshard.verify.oracle import check as check_oracle
from tpshard.verify.report import Communication, Compared, Inputs, Integrity, Numerics, Oracle, Report

MODES = ("simulated", "distributed")
DEFAULT_BATCH = 4
# Random sequences in one batch: the dense and the sharded traces each hold B x T x (vocab_size + (n_layer +
# 1) x n_embd) floats (GPT-2 at B 64, T 64: 0.9 GB of logits each), so a fixed bound, checked first.
MAX_BATCH = 64
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

Progress = Callable[[str], None]


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
    oracle: str | None = None,
    comm: str = "auto",
    sequence_parallel: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Verify a shard set. Raises TpshardError only when verification cannot run (no such directory,
    no manifest, an unreadable reference, bad options); a damaged shard set is a failed Report.
    sequence_parallel: the sharded run's forwards of more than one token run that schedule."""
    say = progress or (lambda _: None)
    if mode not in MODES:
        raise TpshardError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    if oracle is not None and oracle not in ORACLES:
        raise TpshardError(f"--oracle {oracle}: expected one of {', '.join(ORACLES)}")
    _check_options(prompts, random_tokens, batch, new_tokens, atol, rtol)
    check_seed(seed)
    shards, manifest_problem = _open(Path(shards_dir))
    reference = load_checkpoint(against) if against is not None else None
    compared = Compared(
        shards=str(shards_dir),
        mode=mode,
        against=str(against) if against is not None else None,
        reference="the --against checkpoint" if reference else "the shard set merged in memory",
        sequence_parallel=sequence_parallel,
    )
    if shards is None:
        integrity = Integrity(passed=False, manifest_ok=False, problems=[f"manifest: {manifest_problem}"])
        return _finish(compared, integrity, None, None, oracle_wanted=oracle is not None)
    m = shards.manifest
    compared.tp_size, compared.dtype, compared.vocab_parallel = m.tp_size, DTYPE_NAMES[m.dtype], m.vocab_parallel
    compared.pp_size, compared.stage_layers = m.grid.pp, list(m.stage_plan.layers)
    compared.model_args = asdict(m.config)
    batches, compared.inputs = _inputs(shards, prompts, random_tokens, batch, new_tokens, seed, tokenizer)
    if sequence_parallel:
        sequence.check_tp(m.tp_size)
    if sequence_parallel and all(idx.size(1) == 1 for idx in batches):
        raise TpshardError(
            "--sequence-parallel: every input is one token long, so no forward would cut the sequence; "
            "give --random-tokens 2 or more, or a longer --prompt"
        )
    say("checking the rank files")
    integrity = check_integrity(shards, reference, against)
    if not integrity.passed:
        return _finish(compared, integrity, None, None, oracle_wanted=oracle is not None)
    tol = _tolerance(m.dtype, atol, rtol)
    say("running the dense model")
    # integrity has just checked every rank file's sha256: the models below need not hash them again; each
    # holds one block at a time (runtime/streamed.py), bit for bit what the resident model computes
    dense = streamed.dense_model(reference or shards, dtype=m.dtype)
    contexts = [greedy_context(idx.size(1), m.config.block_size, new_tokens) for idx in batches]
    dense_traces = [trace(dense, idx, ctx, new_tokens) for idx, ctx in zip(batches, contexts, strict=True)]
    del dense
    say(f"running the sharded model ({mode}{', sequence-parallel' if sequence_parallel else ''})")
    sharded, compared.comm = sharded_traces(shards, batches, contexts, new_tokens, mode, comm, sequence_parallel)
    numerics = compare(dense_traces, sharded, tol, m.dtype)
    communication = count_communication(sharded, shards, mode, sequence_parallel)
    torch_part = None
    if oracle is not None:
        say("running the same weights through PyTorch's tensor parallelism (the oracle)")
        logits = [t.logits for t in sharded], [t.logits for t in dense_traces]
        torch_part = check_oracle(shards, batches, *logits, *tol[:2])
    return _finish(compared, integrity, numerics, communication, torch_part)


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
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise TpshardError(f"--batch {batch}: must be between 1 and {MAX_BATCH}")
    if random_tokens is not None and random_tokens < 1:
        raise TpshardError(f"--random-tokens {random_tokens}: must be at least 1")
    if new_tokens < 0:
        raise TpshardError(f"--tokens {new_tokens}: must be 0 or more")
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise TpshardError(f"{name} {value}: must be a finite number, 0 or more")


def refuse_report_over_inputs(
    report: str | Path,
    shards_dir: str | Path,
    against: str | Path | None = None,
    tokenizer: str | Path | None = None,
    option: str = "--html",
) -> None:
    """Before verify runs: a report file must not replace anything verify reads (the shard directory
    and every file in it, --against and, for a directory, its files, --tokenizer), whatever path it
    is reached by (symlinks resolved); and its directory must exist."""
    report = Path(report)
    inputs = [file for p in (shards_dir, against, tokenizer) if p is not None for file in input_files(Path(p))]
    try:
        refuse_output_over_inputs(report, inputs)
    except TpshardError as e:
        raise TpshardError(f"{option} {e}") from None
    if report.is_dir():
        raise TpshardError(f"{option} {report}: is a directory, expected a file name for the report")
    if not report.parent.is_dir():
        raise TpshardError(f"{option} {report}: no such directory {report.parent}")


def _open(directory: Path) -> tuple[ShardSet | None, str | None]:
    """The shard set, or (None, why) when its manifest is damaged. No directory or no manifest at all
    is not a shard set to verify: that raises."""
    kind = kind_of(directory)
    if kind is Kind.MISSING:
        raise TpshardError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise TpshardError(f"{directory}: not a directory")
    if kind is not Kind.SHARD_SET:
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
    compared: Compared,
    integrity: Integrity,
    numerics: Numerics | None,
    communication: Communication | None,
    oracle: Oracle | None = None,
    *,
    oracle_wanted: bool = False,
) -> Report:
    why = "integrity failed" if integrity.manifest_ok else "the manifest is unreadable"
    numerics = numerics or Numerics(passed=False, skipped=f"skipped: {why}")
    communication = communication or Communication(passed=False, skipped=f"skipped: {why}")
    if oracle_wanted and oracle is None:
        oracle = Oracle(passed=False, skipped=f"skipped: {why}")
    parts = {"integrity": integrity, "numerics": numerics, "communication": communication}
    if oracle is not None:
        parts["torch oracle"] = oracle
    passed = all(part.passed for part in parts.values())
    if passed:
        summary = "integrity, numerics and communication all hold"
        if oracle is not None:
            summary = "integrity, numerics, communication and the torch oracle all hold"
    else:
        failed = [f"{name}: {part.problems[0]}" for name, part in parts.items() if part.problems]
        more = sum(len(part.problems) for part in parts.values()) - len(failed)
        summary = "; ".join(failed) + (f" (and {more} more)" if more else "")
        if integrity.passed is False:
            summary += "; numerics and communication skipped" + (" (and the torch oracle)" if oracle else "")
    return Report(passed, summary, compared, integrity, numerics, communication, oracle=oracle)


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
    if new_tokens > config.block_size:  # each greedy step goes through the KV cache, which holds block_size tokens
        raise TpshardError(f"--tokens {new_tokens}: more than the model's block_size {config.block_size}")
    if prompts:
        from tpshard.tokenizer import find_tokenizer

        tokenizer = find_tokenizer(
            shards.directory,
            dataset=shards.manifest.dataset,
            vocab_size=config.vocab_size,
            explicit=tokenizer_file or shards.tokenizer_path,  # the one shipped in the set, whatever its name
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
