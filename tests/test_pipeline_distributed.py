"""Pipeline stages with real processes: tp x pp ranks on gloo over loopback, each loading only its own
file, stages handing activations on by send/recv; torchrun across two "nodes" (two agents on
127.0.0.1); and failures in any stage that end every rank with one line naming the rank.

Each run starts up to 4 Python processes that import torch on 2 cores: the model is tiny, the runs few."""

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from test_distributed import (  # noqa: F401 (model: a fixture)
    CHARS,
    CONFIG,
    GENERATE,
    Run,
    assert_all_gone,
    dense_text,
    kill_and_finish,
    model,
    run_with_a_corrupt_file,
    streaming_workers,
)

from tpshard.convert import split_checkpoint
from tpshard.files.paths import load_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def sets(model: tuple[Path, Path]) -> dict[str, Path]:  # noqa: F811 (the fixture imported above)
    """The tp 2 model of test_distributed as tp 2 x pp 2, tp 1 x pp 2 (one layer a stage) and tp 2."""
    ckpt, tp2 = model
    assert CONFIG.n_layer == 2 and len(CHARS) == CONFIG.vocab_size
    dense = load_checkpoint(ckpt)
    found = {"ckpt": ckpt, "tp2": tp2}
    for tp, pp in ((2, 2), (1, 2)):
        found[f"tp{tp}pp{pp}"] = ckpt.parent / f"tp{tp}pp{pp}"
        split_checkpoint(dense, tp, found[f"tp{tp}pp{pp}"], pp=pp, tokenizer_file=ckpt.parent / "meta.pkl")
    return found


@pytest.mark.parametrize(
    ("name", "sampling"),
    [("tp2pp2", ["--greedy"]), ("tp1pp2", ["--seed", "11", "--top-k", "5", "--num-samples", "2"])],
    ids=["tp2xpp2-greedy", "tp1xpp2-sampled"],
)
def test_distributed_stages_print_the_dense_text(sets: dict[str, Path], name: str, sampling: list[str]) -> None:
    expected = dense_text(sets["ckpt"], *sampling, "--max-new-tokens", "60")  # 60 > block_size 32: cropped
    with Run(sets[name], "--mode", "distributed", *sampling, "--max-new-tokens", "60", "--stats") as run:
        code, out, err = run.finish()
    assert code == 0, err
    assert out == expected
    grid = "tp 2 x pp 2 (4 processes" if name == "tp2pp2" else "tp 1 x pp 2 (2 processes"
    assert grid in err and "stage hand-overs" in err and "1 sends per forward" in err and "Traceback" not in err


def test_distributed_verify_counts_the_stages(sets: dict[str, Path], cli) -> None:
    code, out, err = cli("verify", sets["tp1pp2"], "--mode", "distributed", "--batch", "2", "--random-tokens", "16")
    assert code == 0, out + err
    assert re.search(r"forward: reductions by stage\s*│\s*2 \+ 2\s*│\s*2 \+ 2", out)  # one block a stage
    assert re.search(r"forward: sends to the next stage\s*│\s*1\s*│\s*1\s", out)
    assert re.search(rf"token: bytes sent between stages\s*│\s*{CONFIG.n_embd * 4}\s*│\s*{CONFIG.n_embd * 4}\s", out)
    assert "PASS  integrity, numerics and communication all hold" in out


def _free_port() -> int:
    with socket.socket() as probe:  # the kernel picks it; closed again for the agent of node 0 to bind
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(tmp_path: Path, nproc_per_node: int, *args: object) -> list[Run]:
    """Two torchrun agents on 127.0.0.1 standing in for two nodes, each starting nproc_per_node ranks."""
    port = _free_port()
    runs = []
    for node in (0, 1):
        command = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", str(nproc_per_node)]
        command += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--log-dir", str(tmp_path / str(node))]
        runs.append(Run(*args, command=[*command, *GENERATE[1:]]))
    return runs


def test_torchrun_two_nodes_of_two_ranks(sets: dict[str, Path], tmp_path: Path) -> None:
    """tp 2 x pp 2 as 2 nodes x 2 processes: stage s on node s, its tensor-parallel group inside the node."""
    expected = dense_text(sets["ckpt"], "--greedy", "--max-new-tokens", "40")
    runs = _two_nodes(tmp_path, 2, sets["tp2pp2"], "--mode", "distributed", "--greedy", "--max-new-tokens", 40)
    with runs[0], runs[1]:
        results = [run.finish() for run in runs]
    assert [code for code, _, _ in results] == [0, 0], results
    assert results[0][1] == expected and results[1][1] == ""  # global rank 0, on node 0, prints


def test_a_tensor_parallel_group_across_nodes_is_refused(sets: dict[str, Path], tmp_path: Path) -> None:
    runs = _two_nodes(tmp_path, 1, sets["tp2"], "--mode", "distributed", "--max-new-tokens", 5)
    with runs[0], runs[1]:
        results = [run.finish() for run in runs]
    err = results[0][2]
    assert results[0][0] != 0
    line = "tpshard: error: rank 0: stage 0's tensor-parallel group (ranks 0-1) spans 2 nodes"
    assert err.count(line) == 1 and "--spread-tp" in err, err  # (then torchrun's agent reports the failed rank)


@pytest.mark.slow
def test_spread_tp_runs_a_tensor_parallel_group_across_nodes(sets: dict[str, Path], tmp_path: Path) -> None:
    expected = dense_text(sets["ckpt"], "--greedy", "--max-new-tokens", "20")
    args = (sets["tp2"], "--mode", "distributed", "--greedy", "--max-new-tokens", 20, "--spread-tp")
    runs = _two_nodes(tmp_path, 1, *args)
    with runs[0], runs[1]:
        results = [run.finish() for run in runs]
    assert [code for code, _, _ in results] == [0, 0], results
    assert results[0][1] == expected


@pytest.mark.slow  # test_distributed.py checks the same path with one stage
def test_a_corrupt_file_in_the_last_stage_stops_every_rank(sets: dict[str, Path], tmp_path: Path) -> None:
    seconds, code, out, err = run_with_a_corrupt_file(sets["tp2pp2"], tmp_path, "rank3-of-4.safetensors")
    assert seconds < 20  # 5 processes start on 2 cores, then stop at once
    assert code == 2 and out == ""
    assert re.fullmatch(r"tpshard: error: rank 3: \S*rank3-of-4.safetensors: sha256 differs .*\n", err), err


@pytest.mark.parametrize(
    "victim", [pytest.param(1, marks=pytest.mark.slow), 2], ids=["first-stage", "last-stage"]
)
def test_a_killed_rank_of_any_stage_stops_every_rank(sets: dict[str, Path], victim: int) -> None:
    with Run(sets["tp2pp2"], "--mode", "distributed", "--max-new-tokens", "1000000") as run:
        line = kill_and_finish(run, streaming_workers(run, 4)[victim])
    assert re.match(r"tpshard: error: rank [0-3]: ", line)


@pytest.mark.slow
def test_a_stuck_rank_stops_every_rank(sets: dict[str, Path]) -> None:
    """A rank that stops answering (SIGSTOP): the others' next exchange with it times out after
    STEP_TIMEOUT (10 s), and the run ends with one line."""
    with Run(sets["tp1pp2"], "--mode", "distributed", "--max-new-tokens", "1000000") as run:
        workers = streaming_workers(run, 2)
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        code, _, err = run.finish(timeout=60)
        assert time.monotonic() - stopped < 10 + 5, err  # the step timeout, then every rank is stopped
    errors = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1, err
    assert re.fullmatch(r"tpshard: error: rank 1: stopped answering \(its process was stopped.*", errors[0]), err
    assert "Traceback" not in err
    assert_all_gone(run.seen)
