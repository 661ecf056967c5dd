"""Shared-memory collectives (tpshard.comm.shm) between real processes: results bit-identical to the
process group's (rank-order sum, rank-order concatenation, rank 0's token) on every rank, for every
dtype, for messages longer than a slot and for hundreds of calls in a row; a killed or a stuck peer ends
the others quickly with LostPeer naming it; no segment outlives its processes, kill -9 included.

Every check runs inside the ranks (module-level functions, started by launch.run): a rank that finds a
wrong result raises, and launch.run raises TpshardError naming it. Each launch starts processes that
import torch (seconds each on a loaded machine), so the checks are grouped into few launches."""

import hashlib
import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tpshard.comm import shm
from tpshard.comm.choose import open_collectives
from tpshard.comm.collectives import Piece
from tpshard.comm.process_group import LostPeer, ProcessGroupCollectives
from tpshard.comm.shm import SharedMemoryCollectives, shm_unavailable_reason
from tpshard.errors import TpshardError
from tpshard.runtime.launch import run

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
# 3 ranks on 2 cores are slow to step together: bf16, where summation order shows, and int64 (tokens)
THREE_RANK_DTYPES = (torch.bfloat16, torch.int64)
SMALL_SLOT = 4096  # bytes: the larger messages below take several rounds
# (B, T, C) of reduce_partials and (B, T, S) of gather_logits: a decode step, and messages longer
# than a small slot: in whole rows (100 columns), in parts of rows (1500), with a short last piece
SHAPES = ((1, 1, 768), (2, 3, 1500), (4, 5, 100), (3, 7, 77))
# a prefill's reduction (batch 8 x 1024 tokens x 768, fp32: 25 MB) and vocab-parallel logits
LARGE = (((8, 1024, 768), torch.float32), ((4, 16, 50304 // 2), torch.bfloat16))


def inputs(seed: int, world: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """Every rank's input, the same on every rank (each rank knows the expected results)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return [torch.randint(-1000, 1000, shape, generator=g) for _ in range(world)]
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(world)]


def reduce_expected(parts: list[torch.Tensor]) -> torch.Tensor:
    # what ProcessGroupCollectives computes: all-gather, then rank_order_sum (torch.sum's result at the 2 and 3
    # ranks tested here; it reassociates from 5)
    return torch.stack(parts).sum(0)


def check(name: str, got: torch.Tensor, expected: torch.Tensor, digest: "hashlib._Hash | None") -> None:
    """digest: what every rank must also get (compared across ranks at the end); None for a result that
    is this rank's own (its chunk of a reduce-scatter)."""
    if got.dtype != expected.dtype or got.shape != expected.shape or not torch.equal(got, expected):
        raise AssertionError(f"{name}: {got.dtype} {tuple(got.shape)} differs from the expected result")
    if digest is not None:
        digest.update(got.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def exercise(
    comms: list[SharedMemoryCollectives], seed: int, digest: "hashlib._Hash", calls: int = 1, dtypes=DTYPES
) -> None:
    """Every pattern, dtype and shape on each of comms, interleaved; then `calls` decode-sized calls."""
    rank, world = comms[0].rank, comms[0].world_size
    for dtype in dtypes:
        for i, shape in enumerate(SHAPES):
            for comm in comms:
                seed += 1
                parts = inputs(seed, world, shape, dtype)
                check("reduce", comm.reduce_partials(parts[rank][None]), reduce_expected(parts), digest)
                check("gather", comm.gather_logits(parts[rank]), torch.cat(parts, dim=-1), digest)
                exercise_pieces(comm, inputs(seed + 10_000, world, shape, dtype), digest)
                if dtype == torch.int64:
                    token = parts[rank].view(-1)[: 8 * (i + 1)].clone()
                    check("broadcast", comm.broadcast_token(token), parts[0].view(-1)[: 8 * (i + 1)], digest)
    for i in range(calls):  # consecutive calls: both buffers reused many times over
        comm, seed = comms[i % len(comms)], seed + 1
        parts = inputs(seed, world, (1, 1, 768), torch.float32)
        if i % 3 == 0:
            check("reduce", comm.reduce_partials(parts[rank][None]), reduce_expected(parts), digest)
        elif i % 3 == 1:
            check("gather", comm.gather_logits(parts[rank]), torch.cat(parts, dim=-1), digest)
        else:
            token = parts[rank].view(torch.int64)[0, 0, :4].clone()
            check("broadcast", comm.broadcast_token(token), parts[0].view(torch.int64)[0, 0, :4], digest)


def exercise_pieces(comm, parts: list[torch.Tensor], digest: "hashlib._Hash") -> None:
    """The sequence-parallel pieces: every rank owns a piece (B, s, C) of a sequence of world * s positions
    in turn; its rows are a strided view of a rank's chunk when B > 1, and so is where the sum goes. Checks
    the bytes received too: a piece by each non-owner, the others' partials of it by the owner."""
    rank, world = comm.rank, comm.world_size
    s = parts[0].size(1)
    local = parts[rank].repeat(1, 2, 1)  # a chunk of two pieces; the piece is its second half
    summed = torch.zeros_like(local)
    for owner in range(world):
        piece = Piece(owner, owner * s, s, first=owner == 0)
        before = comm.received_bytes
        mine = local[:, s:] if rank == owner else None
        check("gather piece", comm.gather_piece(mine, piece, local), parts[owner], digest)
        out = summed[:, s:] if rank == owner else None
        comm.reduce_piece(parts[rank][None], piece, out)
        if rank == owner:
            check("reduce piece", summed[:, s:], reduce_expected(parts), None)
        size = parts[0].numel() * parts[0].element_size()
        received = comm.received_bytes - before
        assert received == (size * (world - 1) if rank == owner else size), f"received {received} bytes"


def leftovers() -> list[str]:
    """What could outlive a run: a tpshard file in /dev/shm, a process of this test still mapping a
    segment (once none does, the kernel frees it: it has no name)."""
    found = [str(p) for p in Path("/dev/shm").glob("*tpshard*")]
    for pid in descendants(os.getpid()):
        try:
            if shm.MEMFD_NAME.encode() in Path(f"/proc/{pid}/maps").read_bytes():
                found.append(f"process {pid} maps a segment")
        except OSError:
            continue  # exited meanwhile
    return found


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc; other people's runs are not ours to check)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture
def no_leftovers():
    assert leftovers() == []
    yield
    assert leftovers() == []


# --- two ranks: results, segments, the factory ---------------------------------------------------------


def _exchanges(group) -> None:
    rank, world = group.rank, group.world_size
    modes = []
    attach = shm._attach

    def seen_attach(pid: int, fd: int, *rest):  # rank 0's segment as another rank sees it, through /proc
        modes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_mode)
        return attach(pid, fd, *rest)

    shm._attach = seen_attach
    small = SharedMemoryCollectives(group.setup, rank, world, slot_bytes=SMALL_SLOT)
    other = SharedMemoryCollectives(group.setup, rank, world)  # a second group at once, default slots
    digest = hashlib.sha256()
    exercise([small, other], seed=100, digest=digest, calls=600)
    for i, (shape, dtype) in enumerate(LARGE):  # many rounds of the default 1 MiB slots
        parts = inputs(200 + i, world, shape, dtype)
        check("large reduce", other.reduce_partials(parts[rank][None]), reduce_expected(parts), digest)
        check("large gather", other.gather_logits(parts[rank]), torch.cat(parts, dim=-1), digest)
        exercise_pieces(other, parts, digest)

    # bit-identical to the process group's collectives, for the same inputs
    gloo = ProcessGroupCollectives(group.setup, rank, world, torch.device("cpu"), poll=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        parts = inputs(7, world, (2, 3, 1500), dtype)
        check(
            "reduce vs gloo", small.reduce_partials(parts[rank][None]), gloo.reduce_partials(parts[rank][None]), digest
        )
        check("gather vs gloo", small.gather_logits(parts[rank]), gloo.gather_logits(parts[rank]), digest)
        for owner in range(world):
            piece = Piece(owner, 3 * owner, 3, first=owner == 0)
            mine = parts[rank] if rank == owner else None
            gathered = small.gather_piece(mine, piece, parts[rank])
            check("gather piece vs gloo", gathered, gloo.gather_piece(mine, piece, parts[rank]), digest)
            sums = [torch.empty_like(parts[0]) if rank == owner else None for _ in range(2)]
            small.reduce_piece(parts[rank][None], piece, sums[0])
            gloo.reduce_piece(parts[rank][None], piece, sums[1])
            reduced = gloo.reduce_partials(parts[rank][None])  # every rank takes part
            if rank == owner:
                check("reduce piece vs gloo", sums[0], sums[1], None)
                check("reduce piece vs reduce", sums[0], reduced, None)
        exercise_pieces(gloo, parts, digest)
    assert small.seconds > 0 and other.seconds > 0

    # the factory: auto picks shm here; shm where it cannot serve says why and what to use
    cpu = torch.device("cpu")
    comm, name = open_collectives("auto", group.setup, group.setup, rank, world, cpu, poll=True)
    assert name == "shm" and isinstance(comm, SharedMemoryCollectives), name
    exercise([comm], seed=300, digest=digest)
    comm.close()
    assert open_collectives("gloo", group.setup, group.setup, rank, world, cpu, poll=True)[1] == "gloo"
    if rank == 1:  # a rank that cannot map the segment: every rank falls back together
        shm._attach = lambda *args: (None, "refused by the test")
    comm, name = open_collectives("auto", group.setup, group.setup, rank, world, cpu, poll=True)
    assert name == "gloo" and isinstance(comm, ProcessGroupCollectives), name
    check("fallback", comm.reduce_partials(torch.ones(1, 1, 1, 8)), torch.full((1, 1, 8), 2.0), digest)
    try:
        open_collectives("shm", group.setup, group.setup, rank, world, cpu, poll=True)
        raise AssertionError("--comm shm where a rank cannot map the segment")
    except TpshardError as e:
        assert "rank 1 could not map rank 0's shared memory" in str(e) and "refused by the test" in str(e), str(e)
    shm._attach = attach
    for device, poll, why in ((torch.device("cuda"), True, "cuda"), (cpu, False, "CPUs")):
        try:
            open_collectives("shm", group.setup, group.setup, rank, world, device, poll=poll)
            raise AssertionError("--comm shm where shm cannot serve")
        except TpshardError as e:
            assert why in str(e) and "--comm gloo" in str(e) and "\n" not in str(e), str(e)

    maps = Path("/proc/self/maps").read_text().splitlines()
    ours = {line.split(maxsplit=5)[-1] for line in maps if "tpshard" in line}
    named = ours == {f"/memfd:{shm.MEMFD_NAME} (deleted)"}  # mapped, and named in no directory
    report = (digest.hexdigest(), small.token, other.token, modes, named)
    reports = group.gather_to_rank0(report)
    if rank == 0:
        assert len({r[0] for r in reports}) == 1, "ranks got different results"
        assert len({r[1] for r in reports}) == 1 and len({r[2] for r in reports}) == 1, (
            "ranks mapped different segments"
        )
        assert small.token != other.token, "two groups share a segment"
        assert all(r[4] for r in reports), "the segment is not an anonymous memfd"
        assert [m & 0o777 for m in reports[1][3]] == [0o600] * 3, reports  # small, other, auto


def test_two_ranks_get_the_process_groups_results(no_leftovers) -> None:
    run(_exchanges, (), nproc=2, device="cpu")


# --- three ranks, and a subgroup beside them -------------------------------------------------------------


def _three_ranks(group) -> None:
    rank, world = group.rank, group.world_size
    pair = dist.new_group(ranks=[1, 2], timeout=timedelta(seconds=120))  # every rank creates every group
    everyone = SharedMemoryCollectives(group.setup, rank, world, slot_bytes=SMALL_SLOT)
    digest, sub_digest = hashlib.sha256(), hashlib.sha256()
    exercise([everyone], seed=500, digest=digest, calls=60, dtypes=THREE_RANK_DTYPES)
    if rank != 0:  # a stage-like subgroup of global ranks 1 and 2, while the whole group's segment lives on
        sub = SharedMemoryCollectives(pair, rank - 1, 2, group_ranks=[1, 2], slot_bytes=SMALL_SLOT)
        assert sub.names == ["rank 1", "rank 2"] and sub.token != everyone.token
        exercise([sub], seed=700, digest=sub_digest, dtypes=THREE_RANK_DTYPES)
    exercise([everyone], seed=900, digest=digest, dtypes=THREE_RANK_DTYPES)
    reports = group.gather_to_rank0((digest.hexdigest(), sub_digest.hexdigest()))
    if rank == 0:
        assert len({r[0] for r in reports}) == 1 and len({r[1] for r in reports[1:]}) == 1, "results differ"


@pytest.mark.slow  # 3 processes on 2 cores: 3-16 s
def test_three_ranks_and_a_subgroup(no_leftovers) -> None:
    run(_three_ranks, (), nproc=3, device="cpu")


# --- failures --------------------------------------------------------------------------------------------


def _lose_a_peer(group, out: str, how: str, victim: int) -> None:
    """The victim dies (kill -9) or hangs after a few calls; the survivor writes what it raised, and when."""
    timeout = timedelta(seconds=1) if how == "stuck" else shm.STEP_TIMEOUT
    comm = SharedMemoryCollectives(group.setup, group.rank, group.world_size, timeout=timeout)
    x = torch.randn(1, 1, 1, 768)
    if group.rank != victim:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher stops the survivors: not before this reports
        try:
            while True:
                start = time.monotonic()
                comm.reduce_partials(x)
        except LostPeer as e:
            report = {"message": str(e), "seconds": time.monotonic() - start, "at": time.time()}
            Path(out, "survivor.json").write_text(json.dumps(report))
            if how == "stuck":
                os._exit(3)  # now, rather than after launch's linger
            raise
    for _ in range(50):
        comm.reduce_partials(x)
    Path(out, "victim.json").write_text(json.dumps({"at": time.time()}))
    if how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # stuck (the launcher stops it once the survivor exits)


@pytest.mark.parametrize(("how", "victim"), [("killed", 0), ("stuck", 1)])
def test_a_lost_peer_ends_the_wait_naming_it(tmp_path: Path, no_leftovers, how: str, victim: int) -> None:
    """A killed peer: rank 0, which made the segment (that changes nothing: it is anonymous); a stuck one."""
    cause = rf"rank {victim}: died without reporting an error \(killed by SIGKILL\)" if how == "killed" else "rank"
    with pytest.raises(TpshardError, match=cause):  # the launcher names the rank that died, not the one that lost it
        run(_lose_a_peer, (str(tmp_path), how, victim), nproc=2, device="cpu")
    survivor = json.loads(Path(tmp_path, "survivor.json").read_text())
    died = json.loads(Path(tmp_path, "victim.json").read_text())
    if how == "killed":
        assert survivor["message"] == f"rank {victim} is gone: its process ended during a collective"
        assert survivor["at"] - died["at"] < 5  # it looks every 5 ms: 5 s only on a very loaded machine
    else:
        assert survivor["message"] == f"no answer from rank {victim} in 1 s: it is stuck"
        assert 1 <= survivor["seconds"] < 4


def _die_during_setup(group) -> None:
    """Rank 1 dies after mapping the segment, while rank 0 still holds its descriptor open."""
    attach = shm._attach

    def attach_and_die(*args):
        attach(*args)
        os.kill(os.getpid(), signal.SIGKILL)

    if group.rank == 1:
        shm._attach = attach_and_die
    SharedMemoryCollectives(group.setup, group.rank, group.world_size)


def test_kill_9_during_setup_leaves_nothing(no_leftovers) -> None:
    with pytest.raises(TpshardError, match=r"rank 1: died without reporting an error \(killed by SIGKILL\)"):
        run(_die_during_setup, (), nproc=2, device="cpu")


def test_shm_is_for_cpu_only() -> None:
    assert "cuda" in shm_unavailable_reason("cuda", 2)
    assert shm_unavailable_reason("cpu", 10_000) is not None  # more ranks than CPUs
    assert "host" in shm_unavailable_reason("cpu", 1, hosts=["a", "b"])
