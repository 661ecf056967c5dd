"""kill -9 in the middle of split, merge and reshard: afterwards the output is either complete and verifiable
or absent, the inputs are byte for byte what they were, and what a killed run leaves behind is a hidden,
unmistakable temporary (`.OUT.xxxxxxxx.partial`, `.OUT.xxxxxxxx.tmp`) that the next run of the same output
removes.

Kills land at random moments (seeded by the test's name). To aim them at the work rather than at Python's
start-up, the commands run in processes forked from a server that has imported torch and tpshard already:
a kill falls anywhere in 1.1 x the command's uninterrupted time, every other one inside the window in which
its output is being written. The slow tests do the same on an ~80 MB checkpoint (and count that the kills
did land mid-write), and also kill freshly started `python -m tpshard` processes.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_hardening import snapshot

from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.files.atomic import ORPHAN_AGE_S, lock_while_writing, remove_orphans
from tpshard.files.checkpoint import model_args
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.testing import random_weights

# What a killed run may leave beside OUT: its temporary, under a hidden name that holds OUT's name, or
# (killed between the two renames of a --force replacement) the previous OUT, moved aside.
LEFTOVER = r"\.{name}\.[a-z0-9_]{{8}}\.(partial|tmp|old)"

SERVER = r"""
import json, os, sys
import torch
import tpshard.cli.main
# what the commands import, before the clock
import tpshard.cli.convert, tpshard.convert, tpshard.files.paths, tpshard.tokenizer
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        sys.argv = ["tpshard", *json.loads(line)]
        try:
            tpshard.cli.main.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 3
        os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # reaped only when asked: until then the pid stays this child's, dead or alive
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Server:
    """Runs tpshard commands in processes forked from one warm interpreter: pid at once, wait status later."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def start(self, argv: list) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([str(a) for a in argv]) + "\n")
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        """The wait status of the last child started."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("reap\n")
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@dataclass
class Job:
    """A command to interrupt: its argv, the output it writes, the files it reads, how to check a result."""

    argv: list
    out: Path
    inputs: Path  # a directory holding every input
    check: Callable[[Path], None]


def check_shards(reference: Path) -> Callable[[Path], None]:
    """A complete shard set: every rank file checks against the manifest, and equals the reference run's."""

    def check(out: Path) -> None:
        shard_set = ShardSet.open(out)
        for rank in range(shard_set.tp_size):
            shard_set.check_file(rank)
            name = shard_set.manifest.files[rank]["file"]
            assert (out / name).read_bytes() == (reference / name).read_bytes()

    return check


def check_merged(reference: Path) -> Callable[[Path], None]:
    """A complete checkpoint: loads, validated, with the reference merge's tensors."""
    want = load_checkpoint(reference).state_dict

    def check(out: Path) -> None:
        got = load_checkpoint(out).state_dict
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    return check


def jobs(model: Path, work: Path, server: Server) -> dict[str, Job]:
    """split, merge and reshard of `model` (a ckpt.pt; its folder is the inputs), each run once uninterrupted
    to make the reference output. The shard set that merge and reshard read is made here too."""
    shards = work / "inputs" / "shards"
    split_checkpoint(load_checkpoint(model), 2, shards)
    argvs = {
        "split": (["split", model, "--tp", 4, "-o", work / "split out"], model.parent, "split out"),
        "merge": (["merge", shards, "-o", work / "merged.pt"], shards, "merged.pt"),
        "reshard": (["reshard", shards, "--tp", 4, "-o", work / "reshard out"], shards, "reshard out"),
    }
    result = {}
    for name, (argv, inputs, out) in argvs.items():
        reference = work / f"reference {out}"
        assert finish(server, [*argv[:-1], reference]) == 0
        check = check_merged(reference) if name == "merge" else check_shards(reference)
        result[name] = Job(argv, work / out, inputs, check)
    return result


def finish(server: Server, argv: list) -> int:
    server.start(argv)
    status = server.wait()
    return os.waitstatus_to_exitcode(status)


def timed(server: Server, argv: list) -> float:
    start = time.perf_counter()
    assert finish(server, argv) == 0
    return time.perf_counter() - start


def write_window(server: Server, job: Job) -> tuple[float, float]:
    """When, in a clean run watched every 2 ms, the output's temporary appears, and when the run ends."""
    start = time.perf_counter()
    server.start(job.argv)
    appeared = None
    while appeared is None and not job.out.exists():
        if leftovers(job.out):
            appeared = time.perf_counter() - start
        time.sleep(0.002)
    assert os.waitstatus_to_exitcode(server.wait()) == 0
    end = time.perf_counter() - start
    job.check(job.out)
    remove(job.out)
    return appeared if appeared is not None else 0.0, end


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def leftovers(out: Path) -> list[Path]:
    pattern = re.compile(LEFTOVER.format(name=re.escape(out.name)))
    return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]


def assert_complete_or_absent(job: Job) -> None:
    """What a kill may leave: the complete output or nothing under its name; hidden temporaries only."""
    if job.out.exists():
        job.check(job.out)
    others = {p.name for p in job.out.parent.iterdir()} - {job.out.name} - {p.name for p in leftovers(job.out)}
    assert all(name.startswith("reference ") or name == "inputs" for name in others), others


def age(paths: list[Path]) -> None:
    """Make temporaries look as old as a killed run's, for the next run to treat them as orphans."""
    past = time.time() - ORPHAN_AGE_S - 5
    for path in paths:
        os.utime(path, (past, past), follow_symlinks=False)


def kill_at_random(server: Server, job: Job, rng: random.Random, kills: int) -> dict[str, int]:
    """Kill `kills` runs of job at random moments; check each aftermath. Returns how many were killed, how
    many of those mid-write (a temporary left behind), and how many finished first."""
    before = snapshot(job.inputs)
    duration = timed(server, job.argv)  # a clean run: its output must check
    job.check(job.out)
    remove(job.out)
    writing, again = write_window(server, job)
    duration = min(duration, again)  # the first run may have read the inputs from disk
    tally = {"killed": 0, "mid-write": 0, "finished": 0}
    for i in range(kills):
        remove(job.out)
        earlier = set(leftovers(job.out))
        pid = server.start(job.argv)
        # anywhere in the run, or (every other kill) while the output is written; a few land after the end
        delay = rng.uniform(writing if i % 2 else 0, 1.1 * duration)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # our child, alive or a zombie, until we ask the server to reap it
        status = server.wait()
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.waitstatus_to_exitcode(status) == 0
        tally["killed" if killed else "finished"] += 1
        if not killed:  # faster than measured (the machine is shared): aim earlier from now on
            duration = min(duration, 0.9 * delay)
            writing = min(writing, 0.9 * duration)
        tally["mid-write"] += bool(set(leftovers(job.out)) - earlier)
        assert_complete_or_absent(job)
        assert snapshot(job.inputs) == before
    # the next run of the same output cleans up after the killed ones (a live run's temporary is locked)
    age(leftovers(job.out))
    remove(job.out)
    assert finish(server, job.argv) == 0
    job.check(job.out)
    assert [p for p in leftovers(job.out) if not p.name.endswith(".old")] == []
    assert snapshot(job.inputs) == before
    return tally


@pytest.fixture(scope="module")
def small(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "inputs" / "model"
    shutil.copytree(bias_ckpt.parent, folder)
    return folder / "ckpt.pt"


@pytest.mark.parametrize("command", ["split", "merge", "reshard"])
def test_kill_9_small(command: str, small: Path, server: Server, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(small.parents[1], work / "inputs")
    job = jobs(work / "inputs" / "model" / "ckpt.pt", work, server)[command]
    kill_at_random(server, job, random.Random(f"small {command}"), kills=5)


def test_kill_9_during_a_forced_replacement(small: Path, server: Server, tmp_path: Path) -> None:
    """split --force over an existing shard set: afterwards the old set, the new one, or (killed between
    the two renames) neither under the name and the old one whole in `.OUT.xxxxxxxx.old/x`."""
    model = tmp_path / "inputs" / "model" / "ckpt.pt"
    shutil.copytree(small.parent, model.parent)
    out, old_ref, new_ref = tmp_path / "out", tmp_path / "reference old", tmp_path / "reference new"
    assert finish(server, ["split", model, "--tp", 4, "-o", old_ref]) == 0
    assert finish(server, ["split", model, "--tp", 2, "-o", new_ref]) == 0
    argv = ["split", model, "--tp", 2, "-o", out, "--force"]
    duration = timed(server, [*argv[:-2], tmp_path / "timing"])
    before, rng = snapshot(model.parent), random.Random("forced")
    for _ in range(5):
        for path in [out, *leftovers(out)]:
            remove(path)
        shutil.copytree(old_ref, out)
        pid = server.start(argv)
        time.sleep(rng.uniform(0, 1.2 * duration))
        os.kill(pid, signal.SIGKILL)
        server.wait()
        if out.exists():
            tp = ShardSet.open(out).tp_size
            check_shards(old_ref if tp == 4 else new_ref)(out)
        else:
            (moved,) = [p / "x" for p in leftovers(out) if (p / "x").exists()]
            check_shards(old_ref)(moved)
        assert snapshot(model.parent) == before


def test_a_live_write_is_never_taken_for_an_orphan(tmp_path: Path) -> None:
    """The lock, not the age, decides: a temporary whose writer is alive survives a later run's cleanup.
    (flock treats two opens of one file as two owners, even in one process: this one plays both runs.)"""
    live = tmp_path / ".out.abcdefgh.partial"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        lock_while_writing(fd)
        age([live])
        remove_orphans(tmp_path / "out", ".partial")
        assert live.exists()
    finally:
        os.close(fd)
    remove_orphans(tmp_path / "out", ".partial")  # its writer gone, the lock with it: an orphan now
    assert not live.exists()
    unrelated = [tmp_path / name for name in (".out.abc.partial", ".outer.abcdefgh.partial", "out.abcdefgh.partial")]
    for path in unrelated:
        path.mkdir()
    age(unrelated)
    remove_orphans(tmp_path / "out", ".partial")
    assert all(path.exists() for path in unrelated)  # only this output's own temporaries are touched


# --- the slow ones: a checkpoint big enough that the writes take a while ------------------------------------

BIG = GPTConfig(block_size=256, vocab_size=8192, n_layer=2, n_head=12, n_embd=768, bias=True)  # ~83 MB


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big") / "inputs" / "model"
    folder.mkdir(parents=True)
    model = random_weights(GPT(BIG), seed=0)
    torch.save({"model": model.state_dict(), "model_args": model_args(BIG), "iter_num": 1}, folder / "ckpt.pt")
    return folder / "ckpt.pt"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["split", "merge", "reshard"])
def test_kill_9_big(command: str, big: Path, server: Server, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(big.parents[1], work / "inputs")
    job = jobs(work / "inputs" / "model" / "ckpt.pt", work, server)[command]
    tally = kill_at_random(server, job, random.Random(f"big {command}"), kills=8)
    assert tally["killed"] >= 4 and tally["mid-write"] >= 2, tally  # the test tested something


@pytest.mark.slow
@pytest.mark.parametrize("command", ["split", "merge", "reshard"])
def test_kill_9_a_fresh_process(command: str, big: Path, server: Server, tmp_path: Path) -> None:
    """`python -m tpshard` as a user starts it, killed at random from start-up to the end of the write."""
    work = tmp_path / "work"
    shutil.copytree(big.parents[1], work / "inputs")
    job = jobs(work / "inputs" / "model" / "ckpt.pt", work, server)[command]
    before = snapshot(job.inputs)
    argv = [sys.executable, "-m", "tpshard", *map(str, job.argv)]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    duration = time.perf_counter() - start
    rng = random.Random(f"fresh {command}")
    for _ in range(4):
        remove(job.out)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3 * duration, duration))  # start-up is most of the first third
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_complete_or_absent(job)
        assert snapshot(job.inputs) == before


@pytest.mark.slow
def test_kill_9_small_many_times(small: Path, server: Server, tmp_path: Path) -> None:
    """Many more kills on the small model, for the rare moments (between the two renames, say)."""
    work = tmp_path / "work"
    shutil.copytree(small.parents[1], work / "inputs")
    for command, job in jobs(work / "inputs" / "model" / "ckpt.pt", work, server).items():
        kill_at_random(server, job, random.Random(f"many {command}"), kills=40)
        remove(job.out)
