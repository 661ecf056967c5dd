"""`tpshard generate`: text from a checkpoint or a shard set, dense, simulated or distributed."""

import codecs
import os
import re
import sys
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from tpshard.cli.app import COMM_HELP, SEQUENCE_PARALLEL_HELP, THREADS_HELP, Comm, DType, app, expand_user, stderr
from tpshard.errors import TpshardError

if TYPE_CHECKING:  # the CLI imports torch only inside commands
    import torch

    from tpshard.files.shardset import ShardSet
    from tpshard.generation import Stats
    from tpshard.runtime.programs import RankUsage, Request
    from tpshard.tokenizer import Tokenizer

SEPARATOR = "---------------"  # nanoGPT sample.py prints it after each sample


class Mode(StrEnum):
    dense = "dense"
    simulated = "simulated"
    distributed = "distributed"


@app.command()
def generate(
    ctx: typer.Context,
    source: Path = typer.Argument(
        ...,
        metavar="CKPT_OR_SHARDS",
        help="A nanoGPT ckpt.pt (runs dense) or a shard directory written by split (runs simulated).",
        callback=expand_user,
    ),
    mode: Mode | None = typer.Option(
        None,
        help="dense: the whole model in one process (a shard set is merged in memory); simulated: every "
        "rank in this process; distributed: one process per rank. \\[default: dense for a checkpoint, "
        "simulated for shards]",
        show_default=False,
    ),
    nproc: int | None = typer.Option(
        None,
        help="Ranks (processes when distributed); must be the shard set's tp x pp. \\[default: its tp x pp]",
    ),
    comm: Comm = typer.Option(Comm.auto, "--comm", help=COMM_HELP),
    sequence_parallel: bool = typer.Option(
        False, "--sequence-parallel", help=SEQUENCE_PARALLEL_HELP + " Simulated and distributed runs."
    ),
    spread_tp: bool = typer.Option(
        False,
        "--spread-tp",
        help="Under torchrun across nodes: run even when a stage's tensor-parallel group spans nodes (its two "
        "collectives per layer then cross the network; by default such a placement is refused).",
    ),
    prompt: str | None = typer.Option(None, help='Text to continue. \\[default: "\\n", as nanoGPT]'),
    prompt_file: Path | None = typer.Option(None, help="Read the prompt from this UTF-8 file."),
    max_new_tokens: int = typer.Option(500, min=1, help="Tokens to generate per sample."),
    temperature: float = typer.Option(
        0.8,
        help="Below 1: more likely tokens; above 1: more varied ones. Finite and above 0; one so small that "
        "logits / temperature overflows float32 (such as 1e-40) takes the most likely token, as --greedy does.",
    ),
    top_k: int = typer.Option(200, min=0, help="Sample among the k most likely tokens; 0: among all."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token (deterministic)."),
    seed: int = typer.Option(
        1337, help="Seed of the sampling RNG, 0 to 2**64-1: same seed, same text, in every mode."
    ),
    num_samples: int = typer.Option(1, min=1, help="Samples, one after another from one RNG stream."),
    device: str = typer.Option(
        "cpu", help="cpu, cuda or cuda:N. Distributed: cpu (gloo) or cuda (NCCL, rank r on cuda:LOCAL_RANK)."
    ),
    dtype: DType | None = typer.Option(None, help="Compute in this dtype. \\[default: the weights' dtype]"),
    threads: int | None = typer.Option(
        None,
        min=1,
        help=THREADS_HELP,
        show_default=False,
    ),
    tokenizer: Path | None = typer.Option(
        None,
        help="meta.pkl or .tiktoken file. \\[default: beside the checkpoint, in the shard set, or GPT-2's]",
    ),
    stats: bool = typer.Option(
        False,
        "--stats",
        help="On stderr: tokens/s, prefill time, sync points and bytes reduced, time in communication, "
        "and (distributed) every rank's peak memory next to its shard's size.",
    ),
) -> None:
    """Generate text: stdout gets the prompt and its continuation, streamed as tokens come, with
    nanoGPT's '---------------' line after each sample; status goes to stderr.

    A checkpoint runs dense. A shard directory runs simulated (all ranks in this process, partial
    sums added at each sync point) or distributed (one process per rank, started here with torch's
    launcher engine, or by torchrun; each rank reads only its own shard file). A set with pipeline
    stages (split --pp) runs them in order, each stage handing its output to the next. For one seed
    the three print the same text.

    Examples:

        tpshard generate ckpt.pt --prompt "ROMEO:" --max-new-tokens 200

        tpshard generate shards --greedy --stats

        tpshard generate shards --mode distributed --num-samples 3 --seed 7

        tpshard generate shards --mode distributed --sequence-parallel --prompt-file long.txt --stats

        torchrun --nproc-per-node 2 -m tpshard generate shards --mode distributed

        torchrun --nnodes 2 --nproc-per-node 2 --node-rank R --master-addr HOST -m tpshard generate \\
            shards_tp2_pp2 --mode distributed      (stage s on node s: tensor parallelism inside a node)
    """
    from tpshard.files.paths import open_model_source
    from tpshard.files.shardset import ShardSet
    from tpshard.files.tensorfile import DTYPES
    from tpshard.generation import Sampling
    from tpshard.parallel import sequence
    from tpshard.runtime import launch
    from tpshard.runtime.models import dense_model, simulated_model
    from tpshard.runtime.programs import Request, generate_on_rank, generate_samples, grid_label
    from tpshard.runtime.threads import for_run
    from tpshard.tokenizer import find_tokenizer

    sampling = Sampling(temperature=temperature, top_k=top_k or None, greedy=greedy, seed=seed)
    sampling.check()  # every option is checked before anything is read
    if nproc is not None and nproc < 1:
        raise TpshardError(f"--nproc {nproc}: must be at least 1")
    if mode is Mode.distributed:
        _check_distributed_device(device)
    else:
        where = _local_device(device)
    text = _prompt_text(prompt, prompt_file)
    opened = open_model_source(source)
    shards = opened if isinstance(opened, ShardSet) else None
    mode = mode or (Mode.simulated if shards else Mode.dense)
    _check_layout(source, mode, shards, nproc)
    if sequence_parallel and mode is Mode.dense:
        raise TpshardError(
            "--sequence-parallel cuts the sequence across a shard set's tensor-parallel ranks; a dense run has "
            "one: use --mode simulated or distributed with a shard set"
        )
    if sequence_parallel and shards is not None:
        sequence.check_tp(shards.manifest.tp_size)
    if shards is not None:
        config, dataset = shards.manifest.config, shards.manifest.dataset
        tokenizer = tokenizer or shards.tokenizer_path  # the one shipped in the set, whatever its name
    else:
        config, dataset = opened.config, opened.train_config.get("dataset")
    tok = find_tokenizer(source, dataset=dataset, vocab_size=config.vocab_size, explicit=tokenizer)
    ids = tok.encode(text)
    if not ids:
        raise TpshardError("the prompt is empty; give at least one character (--prompt or --prompt-file)")
    request = Request(
        prompt=ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        dtype=DTYPES[dtype.value] if dtype else None,
        show_stats=stats,
        sequence_parallel=sequence_parallel,
    )
    ranks = shards.manifest.grid.world_size if shards is not None and mode is Mode.distributed else 1
    ctx.with_resource(for_run(config, ranks, threads))  # this process's threads, and each rank's (runtime/threads.py)
    if mode is Mode.distributed:
        assert shards is not None
        grid = shards.manifest.grid
        args = (shards, request, TerminalSink(tok))
        options = {"grid": grid, "spread_tp": spread_tp, "comm": comm.value}
        launch.run(generate_on_rank, args, nproc=grid.world_size, device=device, **options)
        return
    if mode is Mode.dense:
        model = dense_model(opened, device=where, dtype=request.dtype)
        label = "dense"
    else:
        assert shards is not None
        model = simulated_model(shards, device=where, dtype=request.dtype, sequence_parallel=sequence_parallel)
        label = f"simulated {grid_label(shards.manifest.grid, sequence_parallel)} (one process)"
    sink = TerminalSink(tok)
    run_stats = generate_samples(model, request, label, sink)
    if stats:
        sink.report(run_stats, request, None)


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise TpshardError("--prompt and --prompt-file both given; choose one")
    if prompt_file is None:
        return "\n" if prompt is None else prompt
    try:
        return prompt_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TpshardError(f"{prompt_file}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TpshardError(f"{prompt_file}: cannot read the prompt ({e})") from None


def _check_layout(source: Path, mode: Mode, shards: "ShardSet | None", nproc: int | None) -> None:
    if shards is None and mode is not Mode.dense:
        raise TpshardError(
            f"{source}: --mode {mode} runs a shard set, and this is a checkpoint; split it first: "
            f"tpshard split {source} --tp N -o SHARDS"
        )
    if nproc is None:
        return
    if mode is Mode.dense:
        raise TpshardError("--nproc applies to --mode simulated and distributed; a dense run is one process")
    assert shards is not None
    grid = shards.manifest.grid
    if nproc != grid.world_size:
        what = f"{grid.tp}-way" if grid.pp == 1 else f"tp {grid.tp} x pp {grid.pp}"
        raise TpshardError(
            f"--nproc {nproc}: {source} is a {what} shard set, one rank per shard file; "
            f"use --nproc {grid.world_size}, or reshard it: tpshard reshard {source} --tp {nproc} -o OUT"
        )


def _local_device(device: str) -> "torch.device":
    """A dense or simulated run's device, checked against the devices torch sees before anything is read."""
    import torch

    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise TpshardError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise TpshardError(f"--device {device}: no CUDA device available to torch; use --device cpu")
    index = int(match.group(1) or 0)  # checked before torch parses it: cuda:99999999999999999999 is no int64
    if index >= count:
        raise TpshardError(f"--device {device}: only {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def _check_distributed_device(device: str) -> None:
    """A distributed run's device: every rank takes cuda:LOCAL_RANK, so no index. Whether there are
    enough devices for the ranks is checked by the launcher, which knows how many ranks."""
    if device not in ("cpu", "cuda"):
        raise TpshardError(f"--device {device}: distributed runs take cpu or cuda (each rank uses cuda:LOCAL_RANK)")


class TerminalSink:
    """Where generation goes on the terminal: text to stdout as tokens come, status and --stats to
    stderr. Pickled to the ranks of a distributed run, where rank 0 uses it."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer

    def started(self, label: str, device: "torch.device", dtype: "torch.dtype") -> None:
        where = f"{label} on {device} ({str(dtype).removeprefix('torch.')}); tokenizer {self.tokenizer.name}"
        stderr.print(where, soft_wrap=True)

    def sample(self, prompt: list[int], tokens: Iterable[int]) -> None:
        _stream(self.tokenizer, prompt, tokens)

    def finished(self, stats: "Stats") -> None:
        seconds = stats.prefill_seconds + stats.decode_seconds
        stderr.print(f"{stats.new_tokens} tokens in {seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s")

    def report(self, stats: "Stats", request: "Request", ranks: "list[RankUsage] | None") -> None:
        _report(stats, request, ranks)


def _stream(tokenizer: "Tokenizer", prompt: list[int], tokens: Iterable[int]) -> None:
    """The prompt, then each token as it comes, then the separator line. Decoded incrementally: a
    BPE token may end inside a UTF-8 character, whose bytes the decoder holds until it is complete."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout.buffer

    def write(data: bytes, final: bool = False) -> None:
        out.write(decoder.decode(data, final).encode())
        out.flush()

    sys.stdout.flush()
    try:
        write(tokenizer.decode_bytes(prompt))
        for token in tokens:
            write(tokenizer.decode_bytes([token]))
        write(b"", final=True)
        out.write(f"\n{SEPARATOR}\n".encode())
        out.flush()
    except BrokenPipeError:  # `| head`: the reader is gone; point stdout at nothing so exit's flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise TpshardError("stdout was closed by its reader (broken pipe); generation stopped") from None


def _report(run_stats: "Stats", request: "Request", ranks: "list[RankUsage] | None") -> None:
    """--stats, on stderr. ranks: each rank's peak RSS, shard file bytes and communication seconds."""
    s = run_stats
    table = Table(title="generation", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("tokens/s", f"{s.tokens_per_second:.1f} overall, {s.decode_tokens_per_second:.1f} decoding")
    table.add_row(
        "prefill", f"{1e3 * s.prefill_seconds / s.samples:.1f} ms per sample (prompt: {len(request.prompt)} tokens)"
    )
    pipelined = ranks is not None and len({u.stage for u in ranks}) > 1
    firsts = []  # tp rank 0 of each stage
    if pipelined:
        assert ranks is not None
        firsts = [next(u for u in ranks if u.stage == stage) for stage in sorted({u.stage for u in ranks})]
    # sequence-parallel: the forwards of more than one token hold no reduction; the sync points are the steps'
    steps = s.forwards - s.sequence_forwards
    if s.sequence_parallel:
        _sequence_rows(table, s, firsts)
    if pipelined:
        per_stage = " + ".join(str(u.sync_points // max(1, steps)) for u in firsts)
        table.add_row("sync points", f"{per_stage} per {_step(s)}, stage by stage (each in its tensor-parallel group)")
        sends = sum(u.sends for u in firsts)
        table.add_row("stage hand-overs", f"{sends / s.forwards:g} sends per forward per tensor-parallel rank")
    elif s.sync_points:
        table.add_row("sync points", f"{s.sync_points / steps:g} per {_step(s)} ({s.sync_points} in {steps})")
        table.add_row("reduced", f"{_size(s.sync_bytes)} of activations per rank, counted at each sync point")
        if s.sends:  # simulated stages: handed over in memory
            table.add_row("stage hand-overs", f"{s.sends / s.forwards:g} per forward, in this process")
    elif not s.sequence_parallel:
        table.add_row("sync points", "none (dense)")
    if ranks is not None:
        share = 100 * s.comm_seconds / (s.prefill_seconds + s.decode_seconds)
        table.add_row("communication", f"{s.comm_seconds:.3f} s in collectives, {share:.0f}% of the run (rank 0)")
        if s.sync_median_seconds:
            median = f"{1e6 * s.sync_median_seconds:.0f} µs median per sync point (rank 0, waiting included)"
            table.add_row("sync time", median)
        if pipelined:
            per_token = 1e3 * s.p2p_seconds / max(1, s.new_tokens)
            what = f"{per_token:.2f} ms per token in sends, receives and the token broadcast (rank 0)"
            table.add_row("between stages", what)
    stderr.print(table)
    if ranks is not None:
        per_rank = Table(title="ranks", title_justify="left")
        columns = ["rank", *(["stage"] if pipelined else []), "shard file", "peak RSS", "communication"]
        if s.sequence_forwards:  # what crossed into each rank in the pieces of the sequence-parallel collectives
            columns.append("sequence-parallel received")
        for name in columns:
            per_rank.add_column(name, justify="right")
        for rank, usage in enumerate(ranks):
            cells = [_size(usage.shard_bytes), _size(usage.peak_rss), f"{usage.comm_seconds:.3f} s"]
            cells += [_size(usage.received_bytes)] if s.sequence_forwards else []
            per_rank.add_row(str(rank), *([str(usage.stage)] if pipelined else []), *cells)
        stderr.print(per_rank)


def _step(s: "Stats") -> str:
    return "one-token step" if s.sequence_parallel else "forward"


def _sequence_rows(table: Table, s: "Stats", stages: "list[RankUsage]") -> None:
    """--stats of a sequence-parallel run: which forwards ran which schedule, and what they exchanged
    (stages: tp rank 0 of each pipeline stage, when there are several)."""
    steps, forwards = s.forwards - s.sequence_forwards, s.sequence_forwards
    long = f"{forwards} forward(s) of more than one token (the prompt; windows past block_size)"
    table.add_row("schedule", f"sequence-parallel for {long}; tensor-parallel for {steps} one-token step(s)")
    if not forwards:
        return
    if stages:
        scatters = " + ".join(f"{u.scatters // forwards}" for u in stages)
        gathers = " + ".join(f"{u.gathers // forwards}" for u in stages)
        per = f"{scatters} reduce-scatters and {gathers} all-gathers per forward, stage by stage"
    else:
        per = f"{s.scatters / forwards:g} reduce-scatters + {s.gathers / forwards:g} all-gathers per forward"
        per += f" in {s.pieces / forwards:g} pieces, spanning {_size(s.sequence_bytes / forwards)} of activations"
    table.add_row("sequence-parallel", per)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
