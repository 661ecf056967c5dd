"""Sequence parallelism (parallel/sequence.py, --sequence-parallel): the positions each rank holds and
the pieces, the simulated model on every grid against the tensor-parallel one, the dense model and
nanoGPT's own code (after cached tokens too, in half precision too); generation past block_size; the
collectives counted against the plan; distributed runs through shared memory and gloo, several pieces a
chunk; verify and its communication report; bad usage.

Tolerances: a sequence-parallel forward multiplies a piece of the sequence at a time, and attends a
piece's queries under an explicit causal mask, where the tensor-parallel one multiplies the whole
sequence: the kernels block the sums differently by the number of rows, so the two differ in fp32
rounding (measured up to 2e-7 on these models' logits, magnitude ~1), as the dense model and nanoGPT
do from both (sums over ranks reassociate): all held to 1e-5. In half precision the two differ by a
unit in the last place of a logit here and there (measured 1 in bfloat16): held to 8 of the largest
logit's. Pieces are made small here (3 positions) as well as left at their default, so that a chunk
spans several pieces on these short sequences."""

import json
import os
import pickle
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpshard.comm.collectives import NETWORK_PIECE_ROWS, PIECE_ROWS, Collectives, Piece
from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import Checkpoint, model_args
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling, TokenPicker, generate
from tpshard.model import GPT, KVCache
from tpshard.parallel import plan
from tpshard.parallel.sequence import SequenceSplit
from tpshard.runtime import launch
from tpshard.runtime.launch import Group
from tpshard.runtime.models import dense_model, distributed_model, sharded_model, simulated_model
from tpshard.runtime.programs import trace
from tpshard.testing import random_weights
from tpshard.verify.communication import count_communication
from tpshard.verify.run import verify_shards

# 3 layers (uneven on 2 stages), 4 heads with biases; 6 heads without, for tp 3 and 6. block 16: the
# prompts below outgrow it, so generation recomputes windows, which run sequence-parallel too
FOUR = GPTConfig(block_size=16, vocab_size=53, n_layer=3, n_head=4, n_embd=32, bias=True)
SIX = GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=6, n_embd=48, bias=False)
GRIDS = [  # (config, tp, pp, vocab_parallel)
    (FOUR, 2, 1, False),
    (FOUR, 4, 1, True),
    (FOUR, 2, 2, False),
    (FOUR, 4, 3, True),
    (SIX, 3, 1, False),
    (SIX, 6, 1, True),
    (SIX, 2, 2, True),
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Checkpoint]:
    """The checkpoints of FOUR and SIX, by their number of heads."""
    folder = tmp_path_factory.mktemp("sp")
    found = {}
    for i, config in enumerate((FOUR, SIX)):
        model = random_weights(GPT(config), seed=20 + i)
        path = folder / f"ckpt{i}.pt"
        torch.save({"model": model.state_dict(), "model_args": model_args(config), "config": {}}, path)
        found[config.n_head] = load_checkpoint(path)
    chars = string.printable[: FOUR.vocab_size]  # a char tokenizer beside FOUR's checkpoint, for the CLI
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return found


def split(ckpt: Checkpoint, out: Path, tp: int, pp: int = 1, vocab_parallel: bool = False) -> ShardSet:
    tokenizer = ckpt.path.parent / "meta.pkl" if ckpt.config.n_head == FOUR.n_head else None
    split_checkpoint(ckpt, tp, out, pp=pp, vocab_parallel=vocab_parallel, tokenizer_file=tokenizer)
    return ShardSet.open(out)


# --- the positions each rank holds ----------------------------------------------------------------------


@pytest.fixture(params=[PIECE_ROWS, 3], ids=["default-pieces", "3-row-pieces"])
def piece_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(Collectives, "piece_rows", request.param)  # in this process (spawned ranks: rank_pieces)
    return request.param


@pytest.mark.parametrize(("length", "tp"), [(8, 2), (7, 3), (2, 4), (5, 5), (1, 2)])
def test_each_rank_holds_its_chunk_and_the_chunks_are_the_sequence(length: int, tp: int) -> None:
    x = torch.randn(2, length, 3)
    whole = SequenceSplit(length, tp, tuple(range(tp)))
    assert whole.chunk == -(-length // tp) and whole.padded == whole.chunk * tp >= length
    chunks = []
    for rank in range(tp):
        mine = SequenceSplit(length, tp, (rank,))
        local = mine.scatter(x)
        assert local.shape == (2, whole.chunk, 3)
        chunks.append(mine.real_rows(local))
    assert torch.equal(torch.cat(chunks, dim=1), x)  # padding dropped, nothing lost, in rank order
    assert torch.equal(whole.real_rows(whole.scatter(x)), x)
    padded = whole.scatter(x)
    assert torch.equal(padded[:, length:], torch.zeros(2, whole.padded - length, 3))


@pytest.mark.parametrize(("length", "tp", "rows"), [(8, 2, 3), (7, 3, 2), (2, 4, 5), (1000, 2, 256), (9, 2, 9)])
def test_pieces_cover_the_sequence_in_order_each_inside_one_chunk(length: int, tp: int, rows: int) -> None:
    split = SequenceSplit(length, tp, (0,), rows)
    pieces = split.pieces()
    covered = [p for piece in pieces for p in range(piece.start, piece.start + piece.rows)]
    assert covered == list(range(length))  # every real position once, in order, no padding
    assert [piece.first for piece in pieces] == [True] + [False] * (len(pieces) - 1)
    for piece in pieces:
        assert 0 < piece.rows <= rows
        chunk = range(piece.owner * split.chunk, (piece.owner + 1) * split.chunk)
        assert piece.start in chunk and piece.start + piece.rows - 1 in chunk


@pytest.mark.parametrize(
    ("length", "tp", "ranks"), [(8, 4, (0, 2)), (8, 2, (1, 2)), (8, 2, ()), (0, 2, (0,)), (8, 2, (-1, 0))]
)
def test_a_process_hosts_consecutive_ranks_of_a_real_sequence(length: int, tp: int, ranks: tuple) -> None:
    with pytest.raises(ValueError, match="consecutive ranks"):
        SequenceSplit(length, tp, ranks)
    with pytest.raises(ValueError, match="pieces of 0 positions"):
        SequenceSplit(8, 2, (0,), 0)


# --- simulated, on every grid ---------------------------------------------------------------------------


class PieceLog(Collectives):
    """The in-process collectives, noting the rows of every piece they carry."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, int]] = []

    def gather_piece(self, rows: torch.Tensor | None, piece: Piece, like: torch.Tensor) -> torch.Tensor:
        self.rows.append(("gather", piece.rows))
        return super().gather_piece(rows, piece, like)

    def reduce_piece(self, partials: torch.Tensor, piece: Piece, out: torch.Tensor | None) -> None:
        assert partials.shape[2] == piece.rows  # what was computed: the piece's positions, never more
        self.rows.append(("reduce", piece.rows))
        super().reduce_piece(partials, piece, out)


# every grid in pieces of the default size (one a chunk here), three of them in pieces of 3 positions too
PIECES = [(*grid, PIECE_ROWS) for grid in GRIDS] + [(*GRIDS[i], 3) for i in (0, 3, 4)]


@pytest.mark.parametrize(("config", "tp", "pp", "vocab_parallel", "piece_rows"), PIECES, indirect=["piece_rows"])
def test_simulated_is_tensor_parallel_the_dense_model_and_nanogpt(
    ckpts: dict, tmp_path: Path, nanogpt, piece_rows: int, config: GPTConfig, tp: int, pp: int, vocab_parallel: bool
) -> None:
    ckpt = ckpts[config.n_head]
    shards = split(ckpt, tmp_path / "s", tp, pp, vocab_parallel)
    sequence, tensor = simulated_model(shards, sequence_parallel=True), simulated_model(shards)
    dense = dense_model(ckpt)
    reference = nanogpt(model_args(config)).eval()
    reference.load_state_dict(ckpt.state_dict, strict=False)
    stages = shards.manifest.stage_plan
    per_stage = [plan.stage_sequence_collectives(config, stages, s, vocab_parallel) for s in range(pp)]
    for length in (2, tp + 1, 7, config.block_size):  # fresh inputs each run; lengths tp does not divide
        idx = torch.randint(0, config.vocab_size, (3, length))
        ours, theirs, want = (trace(model, idx, 1, 0) for model in (sequence, tensor, dense))
        assert len(ours.hidden) == config.n_layer + 1
        with torch.inference_mode():
            nanogpt_logits = reference(idx)
        for other in (theirs.logits, want.logits, nanogpt_logits):
            torch.testing.assert_close(ours.logits, other, atol=1e-5, rtol=0)
        for a, b, c in zip(ours.hidden, theirs.hidden, want.hidden, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
        # counted, not assumed: no all-reduce, 2 reduce-scatters and 2 all-gathers per block, + the output layer's
        assert ours.stage_collectives == [(0, *counts) for counts in per_stage]
        f = ours.forwards[0]
        assert (f["reductions"], f["scatters"], f["gathers"]) == (0, *map(sum, zip(*per_stage, strict=True)))
        assert f["sequence_parallel"] == 1 and theirs.forwards[0]["sequence_parallel"] == 0
        # each spans the real positions [3, length, C], the padding in no piece
        assert f["sequence_bytes"] == (f["scatters"] + f["gathers"]) * 3 * length * config.n_embd * 4
        assert f["received_bytes"] == 0  # one process: nothing crosses
        assert theirs.forwards[0]["scatters"] == theirs.forwards[0]["gathers"] == 0


@pytest.mark.parametrize(("tp", "vocab_parallel"), [(2, False), (4, True)])
def test_a_forward_after_cached_tokens(
    ckpts: dict, tmp_path: Path, piece_rows: int, tp: int, vocab_parallel: bool
) -> None:
    """A sequence-parallel forward that continues a KV cache (positions from start > 0): the logits of the
    whole sequence's forward, for those positions."""
    ckpt = ckpts[4]
    shards = split(ckpt, tmp_path / "s", tp, vocab_parallel=vocab_parallel)
    models = simulated_model(shards, sequence_parallel=True), simulated_model(shards), dense_model(ckpt)
    idx = torch.randint(0, FOUR.vocab_size, (3, FOUR.block_size))
    with torch.inference_mode():
        whole = models[2](idx)
        for model in models:
            cache = KVCache(model, 3)
            model(idx[:, :5], cache)
            torch.testing.assert_close(model(idx[:, 5:], cache), whole[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_tensor_parallel_to_a_few_ulps(
    ckpts: dict, tmp_path: Path, piece_rows: int, dtype: torch.dtype
) -> None:
    shards = split(ckpts[4], tmp_path / "s", 2)
    sequence, tensor = (simulated_model(shards, dtype=dtype, sequence_parallel=on) for on in (True, False))
    idx = torch.randint(0, FOUR.vocab_size, (3, FOUR.block_size))
    with torch.inference_mode():
        ours, theirs = sequence(idx), tensor(idx)
    assert ours.dtype == dtype
    ulp = torch.finfo(dtype).eps * theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, atol=8 * ulp, rtol=0)


def test_the_schedule_refuses_a_forward_that_records_gradients(ckpts: dict, tmp_path: Path) -> None:
    model = simulated_model(split(ckpts[4], tmp_path / "s", 2), sequence_parallel=True)
    with pytest.raises(ValueError, match="inference only"):
        model(torch.randint(0, FOUR.vocab_size, (1, 6)))
    model(torch.randint(0, FOUR.vocab_size, (1, 1))).sum().backward()  # one token: tensor-parallel, as ever


@pytest.mark.parametrize("tp", [2, 4])
def test_no_forward_computes_more_than_a_piece(ckpts: dict, tmp_path: Path, piece_rows: int, tp: int) -> None:
    """Between an all-gather and a reduce-scatter the work goes a piece at a time: the rows every collective
    carries are pieces of at most piece_rows positions that add up to the sequence."""
    shards = split(ckpts[4], tmp_path / "s", tp)
    log = PieceLog()
    model = sharded_model(shards, list(range(tp)), log, sequence_parallel=True)
    length = FOUR.block_size - 1
    with torch.inference_mode():
        model(torch.randint(0, FOUR.vocab_size, (2, length)))
    for kind in ("gather", "reduce"):
        rows = [n for what, n in log.rows if what == kind]
        assert max(rows) <= piece_rows and sum(rows) == length * (2 * FOUR.n_layer + (kind == "gather"))


def test_a_one_token_forward_runs_the_tensor_parallel_schedule(ckpts: dict, tmp_path: Path) -> None:
    shards = split(ckpts[4], tmp_path / "s", 2)
    model = simulated_model(shards, sequence_parallel=True)
    got = trace(model, torch.randint(0, FOUR.vocab_size, (2, 6)), 3, 4)
    full, prefill, *steps = got.forwards  # the whole input's forward, then greedy decoding's
    assert (full["length"], prefill["length"]) == (6, 3)
    assert all(f["scatters"] == 2 * FOUR.n_layer and f["reductions"] == 0 for f in (full, prefill))
    assert len(steps) == 3 and all(s["length"] == 1 and s["scatters"] == s["gathers"] == 0 for s in steps)
    assert all(s["reductions"] == plan.sync_points(FOUR) for s in steps)
    assert [f["sequence_parallel"] for f in got.forwards] == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (4, 3)])
def test_generation_past_block_size_gives_the_dense_tokens(
    ckpts: dict, tmp_path: Path, greedy: bool, tp: int, pp: int
) -> None:
    ckpt = ckpts[4]
    shards = split(ckpt, tmp_path / "s", tp, pp)
    prompt = torch.randint(0, FOUR.vocab_size, (2, 5))
    runs = []
    for model in (dense_model(ckpt), simulated_model(shards, sequence_parallel=True)):
        picker = TokenPicker(Sampling(greedy=greedy, seed=5, top_k=10))
        runs.append(torch.stack(list(generate(model, prompt, 3 * FOUR.block_size, picker)), 1))
    assert torch.equal(runs[0], runs[1])


def test_stats_count_the_schedule_of_each_forward(ckpts: dict, tmp_path: Path) -> None:
    shards = split(ckpts[4], tmp_path / "s", 2)
    model = simulated_model(shards, sequence_parallel=True)
    runner = Runner(model, Sampling(greedy=True))
    new = 2 * FOUR.block_size
    tokens = list(runner.sample(list(range(1, 8)), new))
    stats = runner.stats()
    # the prompt's forward, then a window recomputed at each step once the text fills block_size
    windows = new - 1 - (FOUR.block_size - 7)
    long = stats.sequence_forwards
    assert len(tokens) == new and stats.sequence_parallel and long == 1 + windows
    per = plan.stage_sequence_collectives(FOUR, shards.manifest.stage_plan, 0)
    assert (stats.scatters, stats.gathers) == (per[0] * long, per[1] * long)
    # the prompt and every window: one piece per rank's chunk, but the output layer's, of the last position alone
    assert stats.pieces == ((per[0] + per[1] - 1) * 2 + 1) * long
    assert stats.sync_points == plan.sync_points(FOUR) * (stats.forwards - long)


# --- verify ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "pp", "mode"), [(2, 1, "distributed"), (2, 2, "distributed"), (2, 2, "simulated"), (4, 1, "simulated")]
)
def test_verify_passes_and_counts_against_theory(
    ckpts: dict, tmp_path: Path, tp: int, pp: int, mode: str
) -> None:
    ckpt = ckpts[4]
    split(ckpt, tmp_path / "s", tp, pp)
    options = {"random_tokens": 13, "batch": 2, "new_tokens": 5, "seed": int(torch.randint(1000, ()))}
    report = verify_shards(tmp_path / "s", against=ckpt.path, mode=mode, sequence_parallel=True, **options)
    assert report.passed, report.summary
    c = report.communication
    assert c.sequence_parallel and c.sequence_forwards == 2  # the full forward and greedy decoding's prefill
    assert c.scatters_measured == [c.scatters_theory] == [2 * FOUR.n_layer]
    assert c.gathers_measured == [c.gathers_theory] == [2 * FOUR.n_layer + 1]
    assert c.sequence_bytes_measured == c.sequence_bytes_theory > 0
    if mode == "distributed":  # counted by the transports, summed over the ranks
        assert c.received_bytes_measured == c.received_bytes_theory == (tp - 1) * c.sequence_bytes_theory
    else:
        assert c.received_bytes_measured is c.received_bytes_theory is None
    assert c.forwards == 4 and c.sync_points_measured == [plan.sync_points(FOUR)]  # the one-token steps
    n = report.numerics
    assert n.passed and len(n.layers) == FOUR.n_layer + 1  # the error through depth, from every rank's chunks
    if pp > 1:
        assert c.stage_collectives_measured == c.stage_collectives_theory
        assert c.sent_bytes_per_token_measured == c.sent_bytes_per_token_theory


def test_verify_fails_when_a_gather_goes_missing(
    ckpts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split(ckpts[4], tmp_path / "s", 2)
    gather = CountingCollectives.gather_piece

    def uncounted_once(self: CountingCollectives, *args) -> torch.Tensor:
        out = gather(self, *args)
        if self.gathers == 1:  # the first all-gather of every count: as if it had not happened
            self.gathers -= 1
        return out

    monkeypatch.setattr(CountingCollectives, "gather_piece", uncounted_once)
    report = verify_shards(tmp_path / "s", random_tokens=9, new_tokens=2, sequence_parallel=True)
    assert not report.passed and not report.communication.passed
    assert any("all-gathers per sequence-parallel forward" in p for p in report.communication.problems)


def test_verify_fails_when_the_bytes_spanned_are_off(
    ckpts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split(ckpts[4], tmp_path / "s", 2)
    reduce = CountingCollectives.reduce_piece

    def one_byte_more(self: CountingCollectives, *args) -> None:
        reduce(self, *args)
        self.sequence_bytes += 1

    monkeypatch.setattr(CountingCollectives, "reduce_piece", one_byte_more)
    report = verify_shards(tmp_path / "s", random_tokens=9, new_tokens=2, sequence_parallel=True)
    assert not report.passed and not report.communication.passed
    assert any("bytes of activations spanned" in p for p in report.communication.problems)


def test_the_bytes_received_are_held_to_n_minus_1_times_those_spanned(ckpts: dict, tmp_path: Path) -> None:
    """What a distributed run's transports counted, summed over the ranks, against theory: the traces of
    a simulated run given the counts a distributed one reports (the runs themselves are tested above)."""
    shards = split(ckpts[4], tmp_path / "s", 4)
    model = simulated_model(shards, sequence_parallel=True)
    traces = [trace(model, torch.randint(0, FOUR.vocab_size, (2, n)), 2, 3) for n in (5, 11)]
    for t in traces:
        for f in t.forwards:
            f["received_bytes"] = 3 * f["sequence_bytes"]
    c = count_communication(traces, shards, "distributed", sequence_parallel=True)
    assert c.passed and c.received_bytes_measured == c.received_bytes_theory > 0
    traces[1].forwards[0]["received_bytes"] -= 4
    c = count_communication(traces, shards, "distributed", sequence_parallel=True)
    assert not c.passed and any("bytes received by the ranks" in p for p in c.problems)


def test_verify_distributed_with_more_ranks_than_positions(ckpts: dict, tmp_path: Path) -> None:
    """tp 4 and 3 positions: the last rank's chunk is all padding, it owns no piece; 2 of greedy decoding's."""
    split(ckpts[4], tmp_path / "s", 4)
    options = {"random_tokens": 3, "batch": 2, "new_tokens": 1, "seed": int(torch.randint(1000, ()))}
    report = verify_shards(tmp_path / "s", mode="distributed", sequence_parallel=True, **options)
    assert report.passed, report.summary
    c = report.communication
    assert c.received_bytes_measured == c.received_bytes_theory == 3 * c.sequence_bytes_theory > 0


def test_a_set_of_one_tensor_parallel_rank_is_refused_in_one_line(ckpts: dict, tmp_path: Path, cli) -> None:
    split(ckpts[4], tmp_path / "s", 1, 2)
    runs = [
        ("generate", tmp_path / "s", "--max-new-tokens", "2"),
        ("verify", tmp_path / "s", "--random-tokens", "4", "--tokens", "2"),
        ("inspect", tmp_path / "s"),
        ("inspect", ckpts[4].path),  # --tp 1, the default
    ]
    for command in runs:
        code, _, err = cli(*command, "--sequence-parallel")
        assert code == 2 and "at tp 1 there is one" in err and err.count("\n") == 1, err


def test_verify_refuses_inputs_of_one_token(ckpts: dict, tmp_path: Path) -> None:
    split(ckpts[4], tmp_path / "s", 2)
    with pytest.raises(TpshardError, match="every input is one token long"):
        verify_shards(tmp_path / "s", random_tokens=1, new_tokens=4, sequence_parallel=True)


# --- the CLI --------------------------------------------------------------------------------------------


def test_generate_dense_refuses_it_in_one_line(ckpts: dict, cli) -> None:
    code, _, err = cli("generate", ckpts[4].path, "--sequence-parallel", "--max-new-tokens", "2")
    assert code == 2 and "--sequence-parallel" in err and "--mode simulated or distributed" in err
    assert err.count("\n") == 1, err


def test_generate_and_verify_json_say_so(ckpts: dict, tmp_path: Path, cli) -> None:
    split(ckpts[4], tmp_path / "s", 2)
    args = ("--sequence-parallel", "--prompt", "alongerprompt", "--max-new-tokens", "30", "--stats")
    code, out, err = cli("generate", tmp_path / "s", *args)
    assert code == 0, err
    assert "simulated tp 2, sequence-parallel" in err and "sequence-parallel for" in err
    assert "reduce-scatters" in err and "one-token step" in err
    options = ("--random-tokens", "9", "--tokens", "4", "--json")
    code, out, _ = cli("verify", tmp_path / "s", "--sequence-parallel", *options)
    report = json.loads(out)
    assert code == 0 and report["compared"]["sequence_parallel"] and report["communication"]["sequence_parallel"]




def test_inspect_shows_the_schedule_the_run_counts(ckpts: dict, tmp_path: Path, cli) -> None:
    ckpt = ckpts[4]
    code, out, _ = cli("inspect", ckpt.path, "--tp", "2", "--pp", "2", "--sequence-parallel", "--json")
    assert code == 0
    schedule = json.loads(out)["sequence"]
    shards = split(ckpt, tmp_path / "s", 2, 2)
    counted = trace(simulated_model(shards, sequence_parallel=True), torch.randint(0, FOUR.vocab_size, (1, 8)), 1, 0)
    f = counted.forwards[0]
    assert schedule["reduce_scatters_per_forward"] == f["scatters"]
    assert schedule["all_gathers_per_forward"] == f["gathers"]
    # per token of a length tp divides: (N-1)/N of the bytes each collective spans
    assert schedule["moved_bytes_per_token"] == f["sequence_bytes"] // 8 // 2
    assert schedule["residual_bytes_per_token"] == FOUR.n_embd * 4 // 2
    code, text, _ = cli("inspect", tmp_path / "s", "--sequence-parallel")
    assert code == 0 and "a forward of more than one token, sequence-parallel at tp 2" in text
    for step in ("ALL-GATHER #1", "REDUCE-SCATTER #2", "on the chunk", "after the last block", "before the first"):
        assert step in text, step
    words = " ".join(text.split())  # rich wraps the table's cells
    assert f"a piece of at most {PIECE_ROWS} positions" in words and f"{NETWORK_PIECE_ROWS} where gloo" in words
    assert "tensor-parallel schedule" in text  # what decode steps run
    code, out, _ = cli("inspect", tmp_path / "s", "--json")
    assert code == 0 and json.loads(out)["sequence"] is None
    code, _, err = cli("inspect", tmp_path / "s" / "rank0-of-4.safetensors", "--sequence-parallel")
    assert code == 2 and "is one rank's file" in err and err.count("\n") == 1

# --- distributed, several pieces a chunk -----------------------------------------------------------------


def rank_pieces(group: Group, shards: ShardSet, idx: torch.Tensor, whole: torch.Tensor) -> None:
    """One rank: pieces of 3 positions; the whole input's logits, and those of a forward after 5 cached
    tokens, against the dense model's (whole); the bytes every rank received against theory."""
    model = distributed_model(shards, group, sequence_parallel=True)
    model.piece_rows = 3
    with torch.inference_mode():
        logits = model(idx)
        cache = KVCache(model, idx.size(0))
        model(idx[:, :5], cache)
        continued = model(idx[:, 5:], cache)
    if model.last:
        torch.testing.assert_close(logits, whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(continued, whole[:, 5:], atol=1e-5, rtol=0)
    counted = group.gather_to_rank0((model.comm.received_bytes, model.comm.sequence_bytes, model.comm.pieces))
    if counted is not None:  # rank 0: each stage's ranks receive N-1 times what their collectives span
        stages = [counted[s * group.grid.tp : (s + 1) * group.grid.tp] for s in range(group.grid.pp)]
        for ranks in stages:
            assert sum(r for r, _, _ in ranks) == (group.grid.tp - 1) * ranks[0][1] > 0, ranks
            assert ranks[0][2] > 2 * FOUR.n_layer // group.grid.pp, "several pieces per collective"


@pytest.mark.parametrize(("tp", "pp", "comm"), [(2, 1, "shm"), (2, 2, "gloo")])
def test_distributed_in_pieces_of_3_positions(ckpts: dict, tmp_path: Path, tp: int, pp: int, comm: str) -> None:
    shards = split(ckpts[4], tmp_path / "s", tp, pp)
    idx = torch.randint(0, FOUR.vocab_size, (2, FOUR.block_size - 1))
    with torch.inference_mode():
        whole = dense_model(ckpts[4])(idx)
    launch.run(rank_pieces, (shards, idx, whole), nproc=tp * pp, device="cpu", grid=shards.manifest.grid, comm=comm)


# --- distributed, through the CLI -------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp", "comm"), [(2, 1, "auto"), (2, 1, "gloo"), (2, 2, "gloo")])
def test_distributed_generate_prints_the_dense_text(
    ckpts: dict, tmp_path: Path, tp: int, pp: int, comm: str
) -> None:
    ckpt = ckpts[4]
    split(ckpt, tmp_path / "s", tp, pp)
    sampling = ("--seed", "3", "--top-k", "8", "--max-new-tokens", "40", "--prompt", "thispromptislong")
    dense = _tpshard("generate", ckpt.path, "--tokenizer", ckpt.path.parent / "meta.pkl", *sampling)
    args = ("--mode", "distributed", "--comm", comm, "--sequence-parallel", "--stats", *sampling)
    code, out, err = _tpshard_run("generate", tmp_path / "s", *args)
    assert code == 0, err
    assert out == dense[1]  # past block_size: windows recomputed sequence-parallel, steps tensor-parallel
    assert "sequence-parallel for" in err and "Traceback" not in err


def _tpshard(*args: object) -> tuple[int, str, str]:
    code, out, err = _tpshard_run(*args)
    assert code == 0, err
    return code, out, err


def _tpshard_run(*args: object) -> tuple[int, str, str]:
    """tpshard in a session of its own, killed with everything under it however the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpshard", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out.decode(), err.decode()
