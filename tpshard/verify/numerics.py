"""verify's second part: dense against sharded, number by number, in float64."""

import torch
from torch.nn import functional as F

from tpshard.runtime.programs import Trace
from tpshard.verify.report import Greedy, LayerError, Numerics

EXACT_GREEDY = (torch.float32, torch.float64)  # half precision: a greedy split at a near tie is allowed


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
