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
    chunked = [f for f in forwards if f["sequence_parallel"]]
    whole = [f for f in forwards if not f["sequence_parallel"]]
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
        _count_sequence(result, chunked, shards, mode)
    if m.grid.pp > 1:
        _count_stages(result, sharded, shards, mode)
    result.passed = not result.problems
    return result


def _per_token(forwards: list[dict[str, int]], key: str) -> float:
    tokens = sum(f["batch"] * f["length"] for f in forwards)
    return sum(f[key] for f in forwards) / tokens if tokens else 0.0


def _count_sequence(result: Communication, forwards: list[dict[str, int]], shards: ShardSet, mode: str) -> None:
    """The sequence-parallel forwards: reduce-scatters and all-gathers per forward; the bytes of the
    activations they span, [B, T, C] each (the output layer's all-gather only [B, 1, C] when the last
    position's logits are all the forward gives), counted piece by piece (no piece carries padding); and,
    distributed, the bytes the ranks received, counted by the transports: over a collective, every
    rank but a piece's owner receives it (all-gather) or the owner receives the N-1 others' partials
    of it (reduce-scatter), N-1 times what it spans in all, (N-1)/N of it per rank."""
    m = shards.manifest
    N, stages = m.tp_size, m.stage_plan
    scatters, gathers = plan.sequence_collectives(m.config, stages, m.vocab_parallel)
    width = m.config.n_embd * m.dtype.itemsize
    result.sequence_parallel = True
    result.sequence_forwards = len(forwards)
    result.sequence_theory = plan.sequence_collectives_explained(m.config, m.vocab_parallel)
    result.scatters_theory, result.gathers_theory = scatters, gathers
    result.scatters_measured = sorted({f["scatters"] for f in forwards})
    result.gathers_measured = sorted({f["gathers"] for f in forwards})
    result.sequence_bytes_theory = sum(_spanned(f, scatters + gathers) * width for f in forwards)
    result.sequence_bytes_measured = sum(f["sequence_bytes"] for f in forwards)
    if mode == "distributed":
        result.received_bytes_theory = (N - 1) * result.sequence_bytes_theory
        result.received_bytes_measured = sum(f["received_bytes"] for f in forwards)
        result.sequence_theory += f"; the ranks receive N-1 = {N - 1} times what they span, (N-1)/N of it per rank"
    else:
        result.sequence_theory += "; simulated, every rank is in this process: no bytes are received"
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
            f"{result.sequence_bytes_measured:,} bytes of activations spanned by the sequence-parallel collectives, "
            f"theory says {result.sequence_bytes_theory:,}"
        )
    if result.received_bytes_measured != result.received_bytes_theory:
        result.problems.append(
            f"{result.received_bytes_measured:,} bytes received by the ranks in the sequence-parallel collectives, "
            f"theory says {result.received_bytes_theory:,}"
        )


def _spanned(f: dict[str, int], collectives: int) -> int:
    """Positions a sequence-parallel forward's collectives span: each the whole sequence, but the output
    layer's all-gather of a forward that wants the last position's logits only (generation's)."""
    return f["batch"] * (collectives * f["length"] - f["last_only"] * (f["length"] - 1))


def _count_stages(result: Communication, sharded: list[Trace], shards: ShardSet, mode: str) -> None:
    """The full forward's collectives stage by stage, and the hand-overs between stages: pp - 1 sends
    of the residual stream per forward, n_embd values per token each (a sequence-parallel forward
    sends each rank's chunk: 1/N of them, with the padding; simulated, one hand-over in memory
    carries every rank's chunk)."""
    m = shards.manifest
    N = m.tp_size
    forwards = [f for t in sharded for f in t.forwards]
    theories = [_stage_theory(shards, t.forwards[0]["sequence_parallel"]) for t in sharded]  # each batch's
    measured = [[tuple(counts) for counts in t.stage_collectives] for t in sharded]
    result.stage_collectives_theory, result.stage_collectives_measured = theories[0], measured[0]
    result.sends_theory = m.grid.pp - 1
    result.sends_measured = sorted({f["sends"] for f in forwards})
    width = m.config.n_embd * m.dtype.itemsize

    def rows_sent(f: dict[str, int]) -> int:  # positions each tensor-parallel rank sends per boundary
        return -(-f["length"] // N) if f["sequence_parallel"] else f["length"]

    def sent_per_rank(f: dict[str, int]) -> int:
        return f["sent_bytes"] // (N if f["sequence_parallel"] and mode == "simulated" else 1)

    tokens = sum(f["batch"] * f["length"] for f in forwards)
    sent = sum(result.sends_theory * f["batch"] * rows_sent(f) * width for f in forwards)
    result.sent_bytes_per_token_theory = sent / tokens if tokens else 0.0
    result.sent_bytes_per_token_measured = sum(map(sent_per_rank, forwards)) / tokens if tokens else 0.0
    for batch, (seen, want) in enumerate(zip(measured, theories, strict=True)):
        if seen != want:
            result.problems.append(f"batch {batch}: collectives stage by stage {seen} measured, theory says {want}")
    if result.sends_measured != [result.sends_theory]:
        seen_sends = ", ".join(map(str, result.sends_measured))
        result.problems.append(f"{seen_sends} sends per forward measured, theory says {result.sends_theory}")
    if result.sent_bytes_per_token_measured != result.sent_bytes_per_token_theory:
        result.problems.append(
            f"{result.sent_bytes_per_token_measured:g} bytes per token sent between stages, "
            f"theory says {result.sent_bytes_per_token_theory:g}"
        )


def _stage_theory(shards: ShardSet, sequence_parallel: bool) -> list[tuple[int, int, int]]:
    """(reductions, reduce-scatters, all-gathers) of a full forward, stage by stage, in either schedule."""
    m = shards.manifest
    stages = range(m.grid.pp)
    if sequence_parallel:
        counts = [plan.stage_sequence_collectives(m.config, m.stage_plan, s, m.vocab_parallel) for s in stages]
        return [(0, *c) for c in counts]
    return [(plan.stage_sync_points(m.config, m.stage_plan, s, m.vocab_parallel), 0, 0) for s in stages]


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
