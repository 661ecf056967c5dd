"""verify's third part: the collectives the sharded runs counted, forward by forward, against the
plan's (parallel/plan.py): the reductions of the tensor-parallel forwards, the reduce-scatters and
all-gathers of the sequence-parallel ones, and the hand-overs between pipeline stages."""

from tpshard.files.shardset import ShardSet
from tpshard.parallel import plan
from tpshard.runtime.programs import Trace
from tpshard.verify.report import Communication


def count_communication(
    sharded: list[Trace], shards: ShardSet, mode: str, sequence_parallel: bool = False
) -> Communication:
    """Every forward's counts against theory. Sequence-parallel, a forward of more than one token runs
    that schedule and a one-token step the tensor-parallel one: each is held to its own."""
    m = shards.manifest
    theory = plan.sync_points(m.config, m.vocab_parallel)
    width = m.config.n_embd * m.dtype.itemsize  # bytes of one position's activations
    forwards = [f for t in sharded for f in t.forwards]
    chunked = [f for f in forwards if sequence_parallel and f["length"] > 1]
    whole = [f for f in forwards if not (sequence_parallel and f["length"] > 1)]
    why = plan.sync_points_explained(m.config, m.vocab_parallel)
    why += f"; bytes per token = {theory} × n_embd {m.config.n_embd} × {m.dtype.itemsize} B"
    result = Communication(
        passed=False,
        sync_points_theory=theory,
        theory=why,
        sync_points_measured=sorted({f["reductions"] for f in whole}),
        forwards=len(whole),
        bytes_per_token_theory=theory * width,
        bytes_per_token_measured=_per_token(whole, "reduced_bytes"),
        note=_gather_note(m.vocab_parallel, mode),
    )
    if whole and result.sync_points_measured != [theory]:
        seen = ", ".join(map(str, result.sync_points_measured))
        result.problems.append(f"{seen} reductions per forward measured, theory says {theory}")
    if whole and result.bytes_per_token_measured != result.bytes_per_token_theory:
        result.problems.append(
            f"{result.bytes_per_token_measured:g} bytes per token reduced, theory says {result.bytes_per_token_theory}"
        )
    if sequence_parallel:
        _count_sequence(result, chunked, shards)
    if m.grid.pp > 1:
        _count_stages(result, sharded, shards, sequence_parallel, mode)
    result.passed = not result.problems
    return result


def _per_token(forwards: list[dict[str, int]], key: str) -> float:
    tokens = sum(f["batch"] * f["length"] for f in forwards)
    return sum(f[key] for f in forwards) / tokens if tokens else 0.0


def _count_sequence(result: Communication, forwards: list[dict[str, int]], shards: ShardSet) -> None:
    """The sequence-parallel forwards: reduce-scatters and all-gathers per forward, and the bytes they
    move per rank, (N-1)/N of the [B, N*c, C] activations each spans (the length padded to N*c)."""
    m = shards.manifest
    N, stages = m.tp_size, m.stage_plan
    scatters, gathers = plan.sequence_collectives(m.config, stages, m.vocab_parallel)
    width = m.config.n_embd * m.dtype.itemsize
    spans = sum((scatters + gathers) * f["batch"] * -(-f["length"] // N) * N * width for f in forwards)
    result.sequence_parallel = True
    result.sequence_forwards = len(forwards)
    result.sequence_theory = plan.sequence_collectives_explained(m.config, m.vocab_parallel)
    result.scatters_theory, result.gathers_theory = scatters, gathers
    result.scatters_measured = sorted({f["scatters"] for f in forwards})
    result.gathers_measured = sorted({f["gathers"] for f in forwards})
    result.sequence_bytes_theory = spans * (N - 1) // N
    result.sequence_bytes_measured = sum(f["sequence_bytes"] for f in forwards) * (N - 1) // N
    leaked = sorted({f["reductions"] for f in forwards} - {0})
    for what, seen, want in (
        ("reduce-scatters", result.scatters_measured, scatters),
        ("all-gathers", result.gathers_measured, gathers),
    ):
        if forwards and seen != [want]:
            counted = ", ".join(map(str, seen))
            result.problems.append(f"{counted} {what} per sequence-parallel forward, theory says {want}")
    if leaked:
        counted = ", ".join(map(str, leaked))
        result.problems.append(f"{counted} all-reduces in a sequence-parallel forward, theory says 0")
    if result.sequence_bytes_measured != result.sequence_bytes_theory:
        result.problems.append(
            f"{result.sequence_bytes_measured:,} bytes moved per rank by the sequence-parallel collectives, "
            f"theory says {result.sequence_bytes_theory:,}"
        )


def _count_stages(
    result: Communication, sharded: list[Trace], shards: ShardSet, sequence_parallel: bool, mode: str
) -> None:
    """The full forward's collectives stage by stage, and the hand-overs between stages: pp - 1 sends
    of the residual stream per forward, n_embd values per token each (a sequence-parallel forward
    sends each rank's chunk: 1/N of them, with the padding; simulated, one hand-over in memory
    carries every rank's chunk)."""
    m = shards.manifest
    N, stages = m.tp_size, m.stage_plan
    forwards = [f for t in sharded for f in t.forwards]
    full_chunked = sequence_parallel and sharded[0].forwards[0]["length"] > 1  # the full forward's schedule
    reductions = [plan.stage_sync_points(m.config, stages, s, m.vocab_parallel) for s in range(m.grid.pp)]
    if full_chunked:
        sequence = [plan.stage_sequence_collectives(m.config, stages, s, m.vocab_parallel) for s in range(m.grid.pp)]
        result.stage_collectives_theory = [(0, *counts) for counts in sequence]
    else:
        result.stage_collectives_theory = [(n, 0, 0) for n in reductions]
    result.stage_collectives_measured = [tuple(counts) for counts in sharded[0].stage_collectives]
    result.sends_theory = m.grid.pp - 1
    result.sends_measured = sorted({f["sends"] for f in forwards})
    width = m.config.n_embd * m.dtype.itemsize

    def chunked(f: dict[str, int]) -> bool:
        return sequence_parallel and f["length"] > 1

    def rows_sent(f: dict[str, int]) -> int:  # positions each tensor-parallel rank sends per boundary
        return -(-f["length"] // N) if chunked(f) else f["length"]

    def sent_per_rank(f: dict[str, int]) -> int:
        return f["sent_bytes"] // (N if chunked(f) and mode == "simulated" else 1)

    tokens = sum(f["batch"] * f["length"] for f in forwards)
    sent = sum(result.sends_theory * f["batch"] * rows_sent(f) * width for f in forwards)
    result.sent_bytes_per_token_theory = sent / tokens if tokens else 0.0
    result.sent_bytes_per_token_measured = sum(map(sent_per_rank, forwards)) / tokens if tokens else 0.0
    if result.stage_collectives_measured != result.stage_collectives_theory:
        seen, want = result.stage_collectives_measured, result.stage_collectives_theory
        result.problems.append(f"collectives stage by stage {seen} measured, theory says {want}")
    if result.sends_measured != [result.sends_theory]:
        seen_sends = ", ".join(map(str, result.sends_measured))
        result.problems.append(f"{seen_sends} sends per forward measured, theory says {result.sends_theory}")
    if result.sent_bytes_per_token_measured != result.sent_bytes_per_token_theory:
        result.problems.append(
            f"{result.sent_bytes_per_token_measured:g} bytes per token sent between stages, "
            f"theory says {result.sent_bytes_per_token_theory:g}"
        )


def _gather_note(vocab_parallel: bool, mode: str) -> str | None:
    if mode == "distributed" and vocab_parallel:
        return "plus one all-gather of the vocabulary-sliced logits per forward (not a reduction, not counted)"
    if mode == "distributed":
        return (
            "plus one all-gather of the vocabulary-sliced logits per forward (not a reduction, not counted): "
            "distributed, each rank computes the logits of its share of the vocabulary, even from a replicated "
            "embedding, so that no rank reads the whole output matrix for every token"
        )
    if vocab_parallel:
        return "distributed, a vocab-parallel set also all-gathers its logits once per forward (not counted)"
    return None
