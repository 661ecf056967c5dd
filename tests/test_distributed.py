"""Distributed generation with real processes (2 gloo ranks on loopback), through the CLI: the dense text,
greedy and sampled, whether tpshard starts the ranks or torchrun does; and failures that end every
rank quickly with one line naming the rank, leaving no process behind.

Each run starts 3 Python processes that import torch, so these tests are few and the model tiny."""

import os
import pickle
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tpshard.cli.app import app
from tpshard.comm.shm import shm_unavailable_reason
from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.files.checkpoint import model_args
from tpshard.files.paths import load_checkpoint
from tpshard.model import GPT
from tpshard.testing import random_weights

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# vocab 61 is odd: the vocabulary-parallel output layer pads the last rank's share;
# block 32 < 60 new tokens: generation crops its window
CONFIG = GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=2, n_head=4, n_embd=32, bias=True)
GENERATE = [sys.executable, "-m", "tpshard", "generate"]
TIMEOUT = 90  # a hung run fails the test instead of the suite


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ckpt.pt, its 2-way shard set), with a char-level meta.pkl; a vocab-parallel split beside it."""
    folder = tmp_path_factory.mktemp("dist")
    torch.save(
        {"model": random_weights(GPT(CONFIG), seed=1).state_dict(), "model_args": model_args(CONFIG), "config": {}},
        folder / "ckpt.pt",
    )
    meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    dense = load_checkpoint(folder / "ckpt.pt")
    split_checkpoint(dense, 2, folder / "tp2", tokenizer_file=folder / "meta.pkl")
    split_checkpoint(dense, 2, folder / "tp2-vocab", vocab_parallel=True, tokenizer_file=folder / "meta.pkl")
    return folder / "ckpt.pt", folder / "tp2"


def dense_text(ckpt: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["generate", str(ckpt), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc: Linux)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_all_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 3
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "processes left behind"


class Run:
    """`tpshard generate ARGS` (or another command) in a session of its own, killed with everything under
    it however the test ends."""

    def __init__(self, *args: object, command: list[str] = GENERATE):
        self.proc = subprocess.Popen(
            [*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        self.seen: set[int] = set()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def watch(self) -> set[int]:
        self.seen |= descendants(self.proc.pid)
        return self.seen

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("sampling", "split", "comm"),
    [(["--greedy"], "tp2", "gloo"), (["--seed", "11", "--top-k", "5", "--num-samples", "2"], "tp2-vocab", "auto")],
    ids=["greedy-gloo", "sampled-vocab-parallel-auto"],
)
def test_distributed_prints_the_dense_text(
    model: tuple[Path, Path], sampling: list[str], split: str, comm: str
) -> None:
    ckpt, shards = model[0], model[1].parent / split
    expected = dense_text(ckpt, *sampling, "--max-new-tokens", "60")
    args = ("--mode", "distributed", "--nproc", "2", "--comm", comm, *sampling, "--max-new-tokens", "60", "--stats")
    with Run(shards, *args) as run:
        code, out, err = run.finish()
    assert code == 0, err
    assert out == expected
    # auto takes shared memory wherever it can serve the group (2 ranks, a core each, on this host)
    ran = "gloo" if comm == "gloo" or shm_unavailable_reason(torch.device("cpu"), 2, poll=True) else "shm"
    assert f"distributed tp 2 (2 processes, {ran})" in err and "peak RSS" in err and "Traceback" not in err
    assert "µs median per sync point" in err


def test_torchrun_starts_the_ranks(model: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, shards = model
    expected = dense_text(ckpt, "--greedy", "--max-new-tokens", "60")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    torchrun += ["--log-dir", str(tmp_path)]  # not a torchelastic_* folder left in /tmp
    with Run(
        shards, "--mode", "distributed", "--greedy", "--max-new-tokens", 60, command=[*torchrun, *GENERATE[1:]]
    ) as run:
        code, out, err = run.finish()
    assert code == 0, err
    assert out == expected  # rank 0 alone prints


def run_with_a_corrupt_file(shards: Path, tmp_path: Path, name: str) -> tuple[float, int, str, str]:
    """A distributed generate of a copy of shards whose file `name` has other bytes of the same size
    (caught by the checksum): (seconds until it ended, exit code, stdout, stderr), every process gone."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in shards.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    data = bytearray((broken / name).read_bytes())
    data[-100] ^= 0xFF
    (broken / name).write_bytes(bytes(data))
    start = time.monotonic()
    with Run(broken, "--mode", "distributed", "--max-new-tokens", "20") as run:
        while run.proc.poll() is None:
            run.watch()
            time.sleep(0.05)
        code, out, err = run.finish()
    assert_all_gone(run.seen)
    return time.monotonic() - start, code, out, err


def test_a_corrupt_rank_file_stops_every_rank(model: tuple[Path, Path], tmp_path: Path) -> None:
    seconds, code, out, err = run_with_a_corrupt_file(model[1], tmp_path, "rank1-of-2.safetensors")
    assert seconds < 15
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"tpshard: error: rank 1: \S*rank1-of-2.safetensors: sha256 differs .*\n", err)


def streaming_workers(run: Run, ranks: int) -> list[int]:
    """The run's rank processes, in rank order, once rank 0 prints (every rank is generating)."""
    ready, _, _ = select.select([run.proc.stdout], [], [], 60)
    assert ready and run.proc.stdout.read1(1)
    workers = [p for p in run.watch() if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == ranks
    return sorted(workers)  # started in rank order


def kill_and_finish(run: Run, pid: int) -> str:
    """SIGKILL pid; the run must end within 10 s with one error line naming a rank killed by SIGKILL,
    no traceback and no process left. Returns that line."""
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = run.finish(timeout=30)
    assert time.monotonic() - killed < 10
    errors = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1, err
    assert re.fullmatch(r"tpshard: error: rank \d+: died without reporting an error \(killed by SIGKILL\).*", errors[0])
    assert "Traceback" not in err
    assert_all_gone(run.seen)
    return errors[0]


def test_a_killed_rank_stops_every_rank(model: tuple[Path, Path]) -> None:
    _, shards = model
    with Run(shards, "--mode", "distributed", "--max-new-tokens", "1000000") as run:
        line = kill_and_finish(run, streaming_workers(run, 2)[-1])
    assert re.match(r"tpshard: error: rank [01]: ", line)


def test_a_rank_that_cannot_reach_the_store_gives_up(model: tuple[Path, Path]) -> None:
    """Rank 1 of a torchrun-style group whose store is not there (a free loopback port nobody listens
    on): it gives up within 10 s of trying, with one line naming the rank, the store and the way out."""
    _, shards = model
    with socket.socket() as probe:  # a free port, closed again: connecting to it is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.monotonic()
    result = subprocess.run(
        [*GENERATE, str(shards), "--mode", "distributed"], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert time.monotonic() - start < 10 + 10  # + starting Python and torch
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(
        rf"tpshard: error: rank 1: could not reach the rendezvous store at 127\.0\.0\.1:{port} .*"
        r"MASTER_ADDR / MASTER_PORT.*\n",
        result.stderr,
    )
