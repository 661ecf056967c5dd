"""verify's second part: dense against sharded, number by number, in float64.

A NaN or an infinity on either side is a failure of its own, named with its side, count and first
position. `diff > tol` is False for a NaN and a maximum over NaNs is NaN, which once let a model of NaN
weights pass: here a logit is within tolerance only when both sides are finite, and the figures (max
abs diff, KL, agreement) are taken over the positions finite on both sides, which the report counts.
"""

from collections.abc import Iterator

import torch
from torch.nn import functional as F

from tpshard.runtime.programs import Trace
from tpshard.verify.report import Greedy, LayerError, NonFinite, Numerics

EXACT_GREEDY = (torch.float32, torch.float64)  # half precision: a greedy split at a near tie is allowed


ROWS = 128  # positions compared at a time: a few [ROWS, vocab] float64 temporaries (GPT-2: 51 MB each)


def compare(
    dense: list[Trace], sharded: list[Trace], tolerance: tuple[float, float, str], dtype: torch.dtype
) -> Numerics:
    """Every fact of the numerics part, computed in float64 over all batches, ROWS positions at a time
    (so that the float64 copies of the logits are never held whole; every figure is the one the
    whole [positions, vocab] comparison gives: maxima and counts over the chunks, means over the
    per-position values)."""
    atol, rtol, source = tolerance
    result = Numerics(passed=False, atol=atol, rtol=rtol, tolerance_source=source)
    result.layers = _layer_errors(dense, sharded)
    d_all = [t.logits.flatten(0, 1) for t in dense]  # [positions, V] each, views
    s_all = [t.logits.flatten(0, 1) for t in sharded]
    result.positions = sum(d.size(0) for d in d_all)
    result.logits_total = sum(d.numel() for d in d_all)
    result.logits_outside = result.finite_positions = 0
    sides = {"dense": _Bad(), "sharded": _Bad()}
    maxima: dict[str, list[float]] = {"diff": [], "dense": []}
    per_row: dict[str, list[torch.Tensor]] = {"kl": [], "top1": [], "top5": [], "decisive": []}
    at = 0  # the first position of the chunk
    for d, s in _chunks(d_all, s_all):
        sides["dense"].add(d, at)
        sides["sharded"].add(s, at)
        at += d.size(0)
        both = d.isfinite() & s.isfinite()
        within = ((s - d).abs() <= atol + rtol * d.abs()) & both  # NaN and infinities: outside
        result.logits_outside += int((~within).sum())
        rows = both.all(-1)  # the positions whose logits are finite on both sides: what the figures are over
        result.finite_positions += int(rows.sum())
        d, s = d[rows], s[rows]
        maxima["diff"].append(_max((s - d).abs()))
        maxima["dense"].append(_max(d.abs()))
        log_d, log_s = F.log_softmax(d, -1), F.log_softmax(s, -1)
        per_row["kl"].append((log_d.exp() * (log_d - log_s)).sum(-1))
        per_row["top1"].append(d.argmax(-1) == s.argmax(-1))
        k = min(5, d.size(-1))
        top5_d, top5_s = d.topk(k).indices.sort(-1).values, s.topk(k).indices.sort(-1).values
        per_row["top5"].append((top5_d == top5_s).all(-1))
        per_row["decisive"].append(_decisive(d.topk(min(2, d.size(-1))).values, atol, rtol))
    result.dense_nonfinite = sides["dense"].facts(dense)
    result.sharded_nonfinite = sides["sharded"].facts(sharded)
    kl, top1_same, top5_same, decisive = (torch.cat(per_row[key]) for key in ("kl", "top1", "top5", "decisive"))
    result.logits_max_abs = max(maxima["diff"], default=0.0)
    largest = max(maxima["dense"], default=0.0)
    result.logits_max_rel = result.logits_max_abs / max(largest, torch.finfo(torch.float64).tiny)
    result.kl_mean, result.kl_max = _mean(kl), _max(kl)
    result.top1_agreement = _mean(top1_same)
    result.top5_agreement = _mean(top5_same)
    result.decisive_positions = int(decisive.sum())
    result.decisive_disagreements = int((decisive & ~top1_same).sum())
    result.greedy = _compare_greedy(dense, sharded, atol, rtol, dtype)
    result.problems = _numeric_problems(result)
    result.passed = not result.problems
    return result


def _chunks(dense: list[torch.Tensor], sharded: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Both sides' logits [positions, V], batch after batch, as float64 chunks of up to ROWS positions."""
    for d, s in zip(dense, sharded, strict=True):
        for first in range(0, d.size(0), ROWS):
            yield d[first : first + ROWS].double(), s[first : first + ROWS].double()


def _max(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


class _Bad:
    """One side's NaN and infinite logits, counted chunk by chunk."""

    def __init__(self) -> None:
        self.values = self.nan = self.positions = 0
        self.first: int | None = None  # the first position holding one, counted over every batch

    def add(self, logits: torch.Tensor, at: int) -> None:
        bad = ~logits.isfinite()
        count = int(bad.sum())
        if not count:
            return
        rows = bad.any(-1)
        self.values += count
        self.nan += int(logits.isnan().sum())
        self.positions += int(rows.sum())
        if self.first is None:
            self.first = at + int(rows.nonzero()[0])

    def facts(self, traces: list[Trace]) -> NonFinite | None:
        """The counts, and the first position as (sequence, token); None when every logit is finite."""
        if self.first is None:
            return None
        sequence, token = 0, self.first
        for t in traces:  # the positions run over each batch's [B, T], batch after batch
            rows, length = t.logits.shape[:2]
            if token < rows * length:
                sequence, token = sequence + token // length, token % length
                break
            token -= rows * length
            sequence += rows
        return NonFinite(
            values=self.values, nan=self.nan, positions=self.positions, first_sequence=sequence, first_token=token
        )


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
        s = torch.cat([t.hidden[i].double().flatten() for t in sharded])
        both = d.isfinite() & s.isfinite()  # the figures over the values finite on both sides, as for logits
        diff = (s[both] - d[both]).abs()
        name = "embedding" if i == 0 else f"block {i - 1}"
        layer = LayerError(name, _max(diff), _mean(diff), _max(d[both].abs()))
        layer.dense_nonfinite, layer.sharded_nonfinite = int((~d.isfinite()).sum()), int((~s.isfinite()).sum())
        layers.append(layer)
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
    for side, bad in (("dense", r.dense_nonfinite), ("sharded", r.sharded_nonfinite)):
        if bad is not None:
            problems.append(
                f"{side} logits not finite: {bad.values:,} of {r.logits_total:,} ({bad.nan:,} NaN, "
                f"{bad.values - bad.nan:,} infinite) at {bad.positions} of {r.positions} positions, first at "
                f"sequence {bad.first_sequence} token {bad.first_token}"
            )
    first = next((layer for layer in r.layers if layer.dense_nonfinite or layer.sharded_nonfinite), None)
    if first is not None:
        problems.append(
            f"residual stream not finite from {first.name} on (there: dense {first.dense_nonfinite:,}, sharded "
            f"{first.sharded_nonfinite:,} values NaN or infinite)"
        )
    if r.logits_outside:
        over = "" if r.finite_positions == r.positions else f" over the {r.finite_positions} finite positions"
        if not r.finite_positions:
            over = ", no position finite on both sides"
        problems.append(
            f"{r.logits_outside:,} of {r.logits_total:,} logits outside atol {r.atol:g} + rtol {r.rtol:g}·|dense| "
            f"(max abs diff {r.logits_max_abs:.3g}{over})"
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
