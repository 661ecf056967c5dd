"""Sequence parallelism (parallel/sequence.py, --sequence-parallel): the positions each rank holds,
the simulated model on every grid against the tensor-parallel one (bit for bit), the dense model and
nanoGPT's own code; generation past block_size; the collectives counted against the plan; distributed
runs through shared memory and gloo; verify and its communication report; bad usage.

Tolerances: sequence-parallel and tensor-parallel runs add the same partials in the same (rank) order
and the LayerNorms and residual adds work row by row, so they are compared with torch.equal. Against
the dense model and nanoGPT, sums over ranks reassociate fp32 additions: measured ~1e-7 on these
models' logits (magnitude ~1), held to 1e-5."""

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

from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import Checkpoint, model_args
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling, TokenPicker, generate
from tpshard.model import GPT
from tpshard.parallel import plan
from tpshard.parallel.sequence import SequenceSplit
from tpshard.runtime.models import dense_model, simulated_model
from tpshard.runtime.programs import trace
from tpshard.testing import random_weights
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


@pytest.mark.parametrize(("length", "tp"), [(8, 2), (7, 3), (2, 4), (5, 5), (1, 2)])
def test_each_rank_holds_its_chunk_and_the_chunks_are_the_sequence(length: int, tp: int) -> None:
    x = torch.randn(2, length, 3)
    whole = SequenceSplit.of(length, tp, tuple(range(tp)))
    assert whole.chunk == -(-length // tp) and whole.padded == whole.chunk * tp >= length
    chunks = []
    for rank in range(tp):
        mine = SequenceSplit.of(length, tp, (rank,))
        local = mine.scatter(x)
        assert local.shape == (2, whole.chunk, 3)
        chunks.append(mine.real_rows(local))
    assert torch.equal(torch.cat(chunks, dim=1), x)  # padding dropped, nothing lost, in rank order
    assert torch.equal(whole.real_rows(whole.scatter(x)), x)
    padded = whole.scatter(x)
    assert torch.equal(padded[:, length:], torch.zeros(2, whole.padded - length, 3))


def test_a_process_hosts_consecutive_ranks() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        SequenceSplit.of(8, 4, (0, 2))


# --- simulated, on every grid ---------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "tp", "pp", "vocab_parallel"), GRIDS)
def test_simulated_is_tensor_parallel_bit_for_bit_and_the_dense_model_and_nanogpt(
    ckpts: dict, tmp_path: Path, nanogpt, config: GPTConfig, tp: int, pp: int, vocab_parallel: bool
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
        ours, theirs = trace(sequence, idx, 1, 0), trace(tensor, idx, 1, 0)
        assert torch.equal(ours.logits, theirs.logits)
        assert len(ours.hidden) == config.n_layer + 1
        assert all(torch.equal(a, b) for a, b in zip(ours.hidden, theirs.hidden, strict=True))
        want = trace(dense, idx, 1, 0)
        torch.testing.assert_close(ours.logits, want.logits, atol=1e-5, rtol=0)
        with torch.inference_mode():
            torch.testing.assert_close(ours.logits, reference(idx), atol=1e-5, rtol=0)
        for a, b in zip(ours.hidden, want.hidden, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        # counted, not assumed: no all-reduce, 2 reduce-scatters and 2 all-gathers per block, + the output layer's
        assert ours.stage_collectives == [(0, *counts) for counts in per_stage]
        f = ours.forwards[0]
        assert (f["reductions"], f["scatters"], f["gathers"]) == (0, *map(sum, zip(*per_stage, strict=True)))
        padded = -(-length // tp) * tp
        spans = (f["scatters"] + f["gathers"]) * 3 * padded * config.n_embd * 4
        assert f["sequence_bytes"] == spans
        assert theirs.forwards[0]["scatters"] == theirs.forwards[0]["gathers"] == 0


def test_a_one_token_forward_runs_the_tensor_parallel_schedule(ckpts: dict, tmp_path: Path) -> None:
    shards = split(ckpts[4], tmp_path / "s", 2)
    model = simulated_model(shards, sequence_parallel=True)
    got = trace(model, torch.randint(0, FOUR.vocab_size, (2, 6)), 3, 4)
    full, prefill, *steps = got.forwards  # the whole input's forward, then greedy decoding's
    assert (full["length"], prefill["length"]) == (6, 3)
    assert all(f["scatters"] == 2 * FOUR.n_layer and f["reductions"] == 0 for f in (full, prefill))
    assert len(steps) == 3 and all(s["length"] == 1 and s["scatters"] == s["gathers"] == 0 for s in steps)
    assert all(s["reductions"] == plan.sync_points(FOUR) for s in steps)


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
    assert len(tokens) == new and stats.sequence_parallel and stats.long_forwards == 1 + windows
    per = plan.stage_sequence_collectives(FOUR, shards.manifest.stage_plan, 0)
    assert (stats.scatters, stats.gathers) == (per[0] * stats.long_forwards, per[1] * stats.long_forwards)
    assert stats.sync_points == plan.sync_points(FOUR) * (stats.forwards - stats.long_forwards)


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
    gather = CountingCollectives.all_gather_sequence

    def uncounted_once(self: CountingCollectives, local: torch.Tensor) -> torch.Tensor:
        out = gather(self, local)
        if self.gathers == 1:  # the first all-gather of every count: as if it had not happened
            self.gathers -= 1
        return out

    monkeypatch.setattr(CountingCollectives, "all_gather_sequence", uncounted_once)
    report = verify_shards(tmp_path / "s", random_tokens=9, new_tokens=2, sequence_parallel=True)
    assert not report.passed and not report.communication.passed
    assert any("all-gathers per sequence-parallel forward" in p for p in report.communication.problems)


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
    for step in ("ALL-GATHER #1", "REDUCE-SCATTER #2", "on the chunk", "after the last block"):
        assert step in text, step
    assert "tensor-parallel schedule" in text  # what decode steps run
    code, out, _ = cli("inspect", tmp_path / "s", "--json")
    assert code == 0 and json.loads(out)["sequence"] is None
    code, _, err = cli("inspect", tmp_path / "s" / "rank0-of-4.safetensors", "--sequence-parallel")
    assert code == 2 and "is one rank's file" in err and err.count("\n") == 1

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
