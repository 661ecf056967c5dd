"""verify's third part: the reductions the sharded runs counted, against the plan's sync points."""

from tpshard.files.shardset import ShardSet
from tpshard.parallel import plan
from tpshard.runtime.programs import Trace
from tpshard.verify.report import Communication


def count_communication(sharded: list[Trace], shards: ShardSet, mode: str) -> Communication:
    """Reductions counted in every forward of the sharded runs, against plan.sync_points."""
    m = shards.manifest
    theory = plan.sync_points(m.config, m.vocab_parallel)
    per_token = theory * m.config.n_embd * m.dtype.itemsize
    forwards = [f for t in sharded for f in t.forwards]
    tokens = sum(f[2] for f in forwards)
    why = plan.sync_points_explained(m.config, m.vocab_parallel)
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
    if m.grid.pp > 1:
        _count_stages(result, sharded, shards, tokens)
    result.passed = not result.problems
    return result


def _count_stages(result: Communication, sharded: list[Trace], shards: ShardSet, tokens: int) -> None:
    """Reductions stage by stage, and the hand-overs between stages: pp - 1 sends of the residual
    stream per forward, n_embd values per token each."""
    m = shards.manifest
    forwards = [f for t in sharded for f in t.forwards]
    result.stage_reductions_theory = [
        plan.stage_sync_points(m.config, m.stage_plan, s, m.vocab_parallel) for s in range(m.grid.pp)
    ]
    result.stage_reductions_measured = sharded[0].stage_reductions
    result.sends_theory = m.grid.pp - 1
    result.sends_measured = sorted({f[3] for f in forwards})
    result.sent_bytes_per_token_theory = result.sends_theory * m.config.n_embd * m.dtype.itemsize
    result.sent_bytes_per_token_measured = sum(f[4] for f in forwards) / tokens if tokens else 0.0
    if result.stage_reductions_measured != result.stage_reductions_theory:
        seen, want = result.stage_reductions_measured, result.stage_reductions_theory
        result.problems.append(f"reductions stage by stage {seen} measured, theory says {want}")
    if result.sends_measured != [result.sends_theory]:
        seen_sends = ", ".join(map(str, result.sends_measured))
        result.problems.append(f"{seen_sends} sends per forward measured, theory says {result.sends_theory}")
    if result.sent_bytes_per_token_measured != result.sent_bytes_per_token_theory:
        result.problems.append(
            f"{result.sent_bytes_per_token_measured:g} bytes per token sent between stages, "
            f"theory says {result.sent_bytes_per_token_theory}"
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
