"""`tpshard inspect`: what a checkpoint, a shard set or a rank file holds, and how it splits.

The facts come from tpshard.describe as dataclasses; this module only renders them (rich), or prints
them as one JSON document.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from tpshard.cli.app import app, expand_user, stdout

if TYPE_CHECKING:  # the CLI imports torch only inside commands
    from tpshard.describe import (
        CheckpointReport,
        RankFileReport,
        SequenceSchedule,
        ShardSetReport,
        SplitPlan,
        StageFacts,
    )

KIND_STYLES = {
    "column": "cyan",
    "row": "magenta",
    "all-reduce": "bold red",
    "reduce-scatter": "bold red",
    "all-gather": "bold yellow",
    "local": "green",
    "chunk": "blue",
}


@app.command()
def inspect(
    path: Path = typer.Argument(
        ...,
        help="A nanoGPT ckpt.pt (or a dense .safetensors, or a Hugging Face GPT-2 directory), a shard "
        "directory written by split, or one rank's .safetensors file.",
        callback=expand_user,
    ),
    tp: int | None = typer.Option(
        None, "--tp", help="Show how the checkpoint splits N ways (default: 1, and the valid N listed)."
    ),
    pp: int | None = typer.Option(
        None, "--pp", help="Show the pipeline stages a checkpoint would be split into (with --tp: tp x pp ranks)."
    ),
    stage_layers: str | None = typer.Option(
        None, "--stage-layers", help="Blocks per stage, e.g. 4,4,4, as split takes it. \\[default: balanced by bytes]"
    ),
    vocab_parallel: bool = typer.Option(
        False, "--vocab-parallel", help="Plan the split as split --vocab-parallel would (wte by vocabulary rows)."
    ),
    sequence_parallel: bool = typer.Option(
        False,
        "--sequence-parallel",
        help="Also show the schedule of a sequence-parallel forward (generate/verify --sequence-parallel): what "
        "runs on each rank's chunk of the sequence, where each all-gather and reduce-scatter sits, what they move.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as one JSON document on stdout, nothing else."),
    checksums: bool = typer.Option(
        False, "--checksums", help="Also compute sha256: every rank file against the manifest, or the checkpoint's own."
    ),
) -> None:
    """Show what PATH holds and how it splits across tensor-parallel ranks.

    A checkpoint: model args, parameters, dtype and bytes, tokenizer, optimizer state (sized, never
    loaded), and every tensor with its split under --tp N: bytes per rank, sync points per forward,
    all-reduce bytes per generated token; with --pp P, the stages: blocks and bytes per rank,
    all-reduces per stage, bytes sent between stages per token, the memory each rank needs. A shard
    directory: the manifest, every rank's file, the stages, one block's data flow with its two
    all-reduces, and an integrity check. A rank file: which rank of which set, and its tensors.

    Exit codes: 0 ok, 1 a shard file fails the integrity check, 2 bad input.

    Examples:

        tpshard inspect ckpt.pt --tp 2

        tpshard inspect ckpt.pt --tp 2 --pp 2

        tpshard inspect shards --checksums

        tpshard inspect shards/rank0-of-2.safetensors --json

        tpshard inspect shards --sequence-parallel
    """
    from tpshard.describe import CheckpointReport, ShardSetReport, inspect_path, to_json
    from tpshard.parallel.grid import Stages

    layers = Stages.parse(stage_layers) if stage_layers is not None else None
    report = inspect_path(
        path,
        tp=tp,
        pp=pp,
        stage_layers=layers,
        vocab_parallel=vocab_parallel,
        checksums=checksums,
        sequence_parallel=sequence_parallel,
    )
    failed = (isinstance(report, ShardSetReport) and not report.integrity.ok) or getattr(
        report, "sha256_matches", None
    ) is False
    if as_json:
        print(json.dumps(to_json(report), indent=2))
    else:
        # tables of full tensor names need room: a pipe or file gets 120 columns, a terminal its own width
        out = stdout if stdout.is_terminal else Console(highlight=False, markup=False, width=max(stdout.width, 120))
        if isinstance(report, CheckpointReport):
            _checkpoint(out, report)
        elif isinstance(report, ShardSetReport):
            _shards(out, report)
        else:
            _rank_file(out, report)
    if failed:
        raise typer.Exit(1)


# --- a checkpoint -----------------------------------------------------------------------------------


def _checkpoint(out: Console, r: "CheckpointReport") -> None:
    out.print(Text.assemble((r.path, "bold"), f"  {r.format}, {_size(r.file_bytes, exact=True)} on disk"))
    facts = _facts()
    facts.add_row("model", _model_args(r.model_args))
    facts.add_row("parameters", f"{r.parameters:,} (wte and lm_head tied: counted once)")
    facts.add_row("weights", f"{r.dtype}, {_size(r.tensor_bytes, exact=True)}")
    facts.add_row("training", _training(r.iter_num, r.best_val_loss, r.dataset))
    if r.tokenizer:
        facts.add_row("tokenizer", r.tokenizer)
    else:
        facts.add_row("tokenizer", Text.assemble(("none found", "yellow"), (f" ({r.tokenizer_note})", "dim")))
    facts.add_row("optimizer", _optimizer(r))
    if r.sha256:
        facts.add_row("sha256", r.sha256)
    out.print(facts)
    out.print()
    _plan(out, r.plan)
    if r.stages:
        out.print()
        _stages(out, r.stages)
    if r.sequence:
        out.print()
        _sequence(out, r.sequence, r.plan.tp_size)


def _stages(out: Console, stages: "list[StageFacts]") -> None:
    """The pipeline stages: what each rank holds, its collectives, what it sends, what it needs."""
    table = Table(title=f"pipeline stages ({len(stages)})", title_justify="left", title_style="bold")
    for name in ("stage", "ranks", "holds", "per rank", "all-reduces", "sends / token", "memory per rank"):
        table.add_column(name, justify="left" if name in ("holds", "ranks") else "right")
    for s in stages:
        ranks = str(s.ranks[0]) if len(s.ranks) == 1 else f"{s.ranks[0]}-{s.ranks[-1]}"
        sends = f"{_size(s.send_bytes_per_token)}" if s.send_bytes_per_token else "-"
        memory = f"{_size(s.memory_bytes)} (KV {_size(s.kv_cache_bytes)})"
        table.add_row(
            str(s.stage), ranks, s.holds, _size(s.rank_bytes), str(s.all_reduces), sends, memory
        )
    out.print(table)
    out.print(
        Text(
            "all-reduces: per forward, inside the stage's tensor-parallel group; sends: the residual stream to the "
            "next stage's rank of the same tp rank, per token; memory: weights + KV cache for one sequence of "
            "block_size tokens (activations aside)",
            "dim",
        )
    )


def _optimizer(r: "CheckpointReport") -> str:
    o = r.optimizer
    if not o.present:
        return "none"
    if not o.tensors:
        return "present, without tensors (param_groups only)"
    return f"present: {o.tensors} tensors, {_size(o.bytes, exact=True)} on disk (sized, not read); split leaves it out"


def _plan(out: Console, p: "SplitPlan") -> None:
    valid = ", ".join(map(str, p.valid_tp_sizes))
    if p.tp_size == 1:
        heading = f"split plan at tp 1 (not split); valid tp sizes: {valid}; choose one with --tp N"
    else:
        heading = f"split plan at tp {p.tp_size}" + (", vocab-parallel" if p.vocab_parallel else "")
        heading += f" (valid tp sizes: {valid})"
    table = Table(title=heading, title_justify="left", title_style="bold")
    table.add_column("tensor", no_wrap=True)
    table.add_column("shape", justify="right")
    table.add_column(f"split across {p.tp_size} rank{'s' * (p.tp_size > 1)}")
    table.add_column("per rank", justify="right")
    table.add_column("bytes/rank", justify="right")
    for i, t in enumerate(p.tensors):
        style = KIND_STYLES.get(t.rule.removeprefix("qkv_"))
        nxt = p.tensors[i + 1].name if i + 1 < len(p.tensors) else ""
        table.add_row(
            t.name,
            _shape(t.shape),
            Text(t.split, style=style or ""),
            _shape(t.rank_shape),
            _size(t.rank_bytes) if t.rule != "tied" else "-",
            end_section=_layer(t.name) != _layer(nxt),
        )
    out.print(table)
    facts = _facts()
    n = p.tp_size
    split_bytes = p.rank_bytes - p.replicated_bytes
    if n == 1:
        facts.add_row("per rank", f"{_size(p.rank_bytes, exact=True)}: the whole model on one rank")
    else:
        facts.add_row(
            "per rank",
            f"{_size(p.rank_bytes, exact=True)}: {_size(split_bytes)} split + {_size(p.replicated_bytes)} replicated "
            f"(held by every rank); {n} x that = {_size(n * p.rank_bytes)}, {n * p.rank_bytes / p.dense_bytes:.2f}x "
            f"the dense {_size(p.dense_bytes)}",
        )
    per_token = f"{p.sync_points_per_forward} all-reduces x {_size(p.allreduce_payload_bytes)}"
    if n == 1:
        once = p.sync_points_once_split
        per_layer = f"{p.sync_points_per_layer} per layer ({once} per forward)"
        facts.add_row("sync points", f"none at tp 1; {per_layer} once split")
        facts.add_row(
            "all-reduce", f"none at tp 1; once split, {_size(once * p.allreduce_payload_bytes)} per generated token"
        )
    else:
        extra = " + 1 for the split embedding" if p.vocab_parallel else ""
        roles = ", ".join(role.removeprefix("the ") for role in p.sync_point_roles)
        per_layer = f"{p.sync_points_per_layer} per layer ({roles}){extra}"
        facts.add_row("sync points", f"{p.sync_points_per_forward} per forward: {per_layer}")
        facts.add_row(
            "all-reduce",
            f"{_size(p.allreduce_bytes_per_token, exact=True)} per generated token = {per_token}: one token's "
            f"n_embd activations, the payload each rank contributes to each all-reduce (a T-token prefill: T x that; "
            f"a ring all-reduce sends about {2 * (n - 1) / n:.2g}x the payload per rank)",
        )
    if p.logits_gather_bytes_per_token:
        facts.add_row("logits", f"all-gathered: {_size(p.logits_gather_bytes_per_token)} per generated token")
    out.print(facts)


# --- a shard set ------------------------------------------------------------------------------------


def _shards(out: Console, r: "ShardSetReport") -> None:
    out.print(Text.assemble((r.path, "bold"), f"  tpshard shard set, format version {r.format_version}"))
    facts = _facts()
    facts.add_row("tp size", f"{r.tp_size}" + (", vocabulary split too (vocab-parallel)" if r.vocab_parallel else ""))
    if r.pp_size > 1:
        facts.add_row("pp size", f"{r.pp_size} pipeline stages: {r.tp_size * r.pp_size} ranks")
    facts.add_row("model", f"{_model_args(r.model_args)}; {r.parameters:,} parameters")
    facts.add_row("dtype", f"{r.dtype}; dense model {_size(r.dense_bytes, exact=True)}")
    facts.add_row("source", _source(r.source))
    if r.tokenizer:
        shipped = " (shipped in the set)" if r.tokenizer_present else " (listed, but the file is missing)"
        facts.add_row("tokenizer", r.tokenizer + shipped)
    else:
        facts.add_row("tokenizer", "none shipped (generate needs --tokenizer, or finds GPT-2's for its vocabulary)")
    out.print(facts)
    out.print()

    table = Table(title="ranks", title_justify="left", title_style="bold")
    for name, justify in (("rank", "right"), ("file", "left"), ("tensors", "right"), ("bytes", "right")):
        table.add_column(name, justify=justify)
    table.add_column("share of dense", justify="right")
    table.add_column("sha256 (manifest)")
    table.add_column("status")
    for rank in r.ranks:
        status = Text(rank.problem, style="red") if rank.problem else Text("ok", style="green")
        table.add_row(
            str(rank.rank),
            rank.file,
            str(rank.tensors),
            _size(rank.bytes, exact=True),
            f"{100 * rank.share:.1f}%",
            rank.sha256[:16],
            status,
        )
    out.print(table)
    out.print()
    if r.stages:
        _stages(out, r.stages)
        out.print()
    out.print(_block_tree(r))
    out.print()
    if r.sequence:
        _sequence(out, r.sequence, r.tp_size)
        out.print()
    out.print(_integrity(r))


def _source(source: dict) -> str:
    parts = [str(source.get("file", "?"))]
    if source.get("sha256"):
        parts.append(f"sha256 {source['sha256'][:16]}…")
    parts.append(_training(source.get("iter_num"), source.get("best_val_loss"), None))
    if source.get("resharded_from_tp"):
        parts.append(f"resharded from tp {source['resharded_from_tp']}")
    if source.get("optimizer_left_out"):
        parts.append("optimizer state left out")
    return ", ".join(parts)


def _block_tree(r: "ShardSetReport") -> Tree:
    layers = r.model_args["n_layer"]
    tree = Tree(
        Text.assemble(
            ("one block", "bold"),
            f" (x {layers} layers) at tp {r.tp_size}: {r.plan.sync_points_per_layer} all-reduces per block, "
            f"{r.plan.sync_points_per_forward} per forward",
        )
    )
    width = max(len(step.op) for branch in r.block for step in branch.steps)
    for branch in r.block:
        node = tree.add(Text(branch.name, style="bold"))
        for step in branch.steps:
            style = KIND_STYLES.get(step.kind, "")
            node.add(Text.assemble((step.op.ljust(width), style or "bold"), "  ", (step.detail, "dim")))
    return tree


def _sequence(out: Console, s: "SequenceSchedule", tp: int) -> None:
    """inspect --sequence-parallel: one block's schedule, what follows the last block, and the figures."""
    counts = f"{s.reduce_scatters_per_forward} reduce-scatters + {s.all_gathers_per_forward} all-gathers per forward"
    title = ("a forward of more than one token, sequence-parallel", "bold")
    tree = Tree(Text.assemble(title, f" at tp {tp}: {counts}"))
    branches = [("before the first block", s.before_blocks), *((b.name, b.steps) for b in s.block)]
    branches.append(("after the last block", s.after_blocks))
    width = max(len(step.op) for _, steps in branches for step in steps)
    for name, steps in branches:
        node = tree.add(Text(name, style="bold"))
        for step in steps:
            op = (step.op.ljust(width), KIND_STYLES.get(step.kind, "") or "bold")
            node.add(Text.assemble(op, "  ", (step.detail, "dim")))
    out.print(tree)
    facts = _facts()
    facts.add_row(
        "moved",
        f"{_size(s.moved_bytes_per_token, exact=True)} received per rank per token of a prompt: (N-1)/N of each "
        "collective's activations (the output layer's over every position; generating gathers the last alone) "
        f"(the tensor-parallel schedule all-reduces {_size(s.all_reduce_bytes_per_token, exact=True)} "
        f"per token; a ring all-reduce moves 2(N-1)/N of that: about the same bytes)",
    )
    facts.add_row("residual stream", f"{_size(s.residual_bytes_per_token, exact=True)} per token per rank: 1/{tp}")
    facts.add_row("pieces", s.pieces)
    facts.add_row("decode", s.decode)
    out.print(facts)


def _integrity(r: "ShardSetReport") -> Text:
    i = r.integrity
    found = f"{i.files_present}/{i.files_expected} files present"
    if not i.ok:
        return Text.assemble(("integrity: FAILED", "bold red"), f" ({found}): ", "; ".join(i.problems))
    checked = "sha256 verified" if i.sha256_checked else "sha256 not checked: add --checksums"
    return Text.assemble(
        ("integrity: ok", "bold green"), f" ({found}, sizes match, headers match the manifest; {checked})"
    )


# --- a rank file ------------------------------------------------------------------------------------


def _rank_file(out: Console, r: "RankFileReport") -> None:
    out.print(
        Text.assemble(
            (r.path, "bold"),
            f"  rank {r.rank} of {r.tp_size * r.pp_size}"
            + (f" (stage {r.stage} of {r.pp_size}, tp {r.tp_size})" if r.pp_size > 1 else "")
            + f" (tpshard format version {r.format_version}), "
            f"{_size(r.file_bytes, exact=True)}",
        )
    )
    facts = _facts()
    if r.shard_set:
        facts.add_row("shard set", f"listed as rank {r.rank} in {Path(r.shard_set) / 'manifest.json'}")
    else:
        facts.add_row("shard set", "no manifest.json beside it lists this file")
    if r.sha256:
        verdict = {True: ("matches the manifest", "green"), False: ("DIFFERS from the manifest", "bold red")}
        note = verdict.get(r.sha256_matches, ("no manifest to compare with", "dim"))
        facts.add_row("sha256", Text.assemble(r.sha256, "  ", note))
    out.print(facts)
    table = Table(title=f"{len(r.tensors)} tensors", title_justify="left", title_style="bold")
    table.add_column("tensor")
    table.add_column("dtype")
    table.add_column("shape", justify="right")
    table.add_column("bytes", justify="right")
    for i, t in enumerate(r.tensors):
        nxt = r.tensors[i + 1].name if i + 1 < len(r.tensors) else ""
        table.add_row(t.name, t.dtype, _shape(t.shape), _size(t.bytes), end_section=_layer(t.name) != _layer(nxt))
    out.print(table)
    header = r.file_bytes - r.tensor_bytes
    out.print(f"{_size(r.tensor_bytes, exact=True)} of tensors + {header:,} bytes of header")


# --- formatting -------------------------------------------------------------------------------------


def _facts() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    return grid


def _model_args(args: dict) -> str:
    """nanoGPT's model_args in train.py's order, then any extension field (activation, ...)."""
    order = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"]
    keys = order + [k for k in args if k not in order and k != "dropout"]
    return ", ".join(f"{k} {args[k]}" for k in keys if k in args)


def _training(iter_num: int | None, best_val_loss: float | None, dataset: str | None) -> str:
    parts = []
    if iter_num is not None:
        parts.append(f"iter {iter_num:,}")
    if best_val_loss is not None:
        parts.append(f"best val loss {best_val_loss:.4f}")
    if dataset:
        parts.append(f"dataset {dataset}")
    return ", ".join(parts) or "no training record"


def _layer(name: str) -> str:
    """'transformer.h.3' for a block's tensors, '' for the others (sections of the tables)."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["transformer", "h"] else ""


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape))


def _size(n: int, *, exact: bool = False) -> str:
    """Decimal units, as disks and downloads count: 1.2 MB; exact adds the bytes."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n_units = n / 1000 ** ("kMGT".index(unit[0]) + 1)
        if n_units < 1000 or unit == "TB":
            human = f"{n_units:.1f} {unit}"
            break
    return f"{human} ({n:,} bytes)" if exact else human
