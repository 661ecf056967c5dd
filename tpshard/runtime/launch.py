"""Distributed runs: one rank of the tp x pp grid per process.

    tpshard generate SHARDS --mode distributed --nproc 2           tpshard starts the ranks itself
    torchrun --nproc-per-node 2 -m tpshard generate SHARDS ...     each rank joins torchrun's group
    torchrun --nnodes 2 --nproc-per-node 2 ... (on each node)      across machines

Either way every rank runs `fn(group, *args)`, where group.comm holds the collectives of the run
(tpshard.comm.process_group; tpshard.comm.pipeline when there are several stages).

Ranks and nodes: global rank = stage * tp + tp rank (parallel/grid.py), and torchrun numbers the
ranks of a node consecutively, so with --nproc-per-node a multiple of tp each stage's
tensor-parallel group (two collectives per layer) lies inside one node, and only the stage
hand-overs (one send per boundary and token) cross the network. A run whose tensor-parallel group
would span nodes is refused unless the caller allows it (spread_tp).

tpshard starts its ranks with torch's own launcher engine (`elastic_launch`, the agent torchrun
runs): the rendezvous store binds 127.0.0.1 port 0, so the kernel picks a free port and no race with
another run is possible, and the ranks bootstrap from that store.

Failures: a rank that raises reports its error, a killed rank closes its sockets (its peers' pending
exchange fails at once), and the agent stops every other rank as soon as one exits non-zero. The
parent then raises one TpshardError naming the rank that failed first, not the peers that merely lost it.
"""

import ctypes
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tpshard.comm.choose import KINDS, open_collectives
from tpshard.comm.collectives import Collectives
from tpshard.comm.pipeline import PipelineCollectives
from tpshard.comm.process_group import STEP_TIMEOUT, LostPeer, lost_peer
from tpshard.errors import TpshardError, first_line
from tpshard.parallel.grid import ParallelDims

# Reaching the rendezvous store at start: a store that does not answer this long is not there (a wrong
# MASTER_ADDR/PORT, a dead agent). TCPStore gives up after about twice its timeout (measured, torch 2.13):
# 5 s ends such a rank within 10 s.
CONNECT_TIMEOUT = timedelta(seconds=5)
# Starting the ranks, loading and checksumming a shard: generous.
SETUP_TIMEOUT = timedelta(seconds=120)
# How long a rank that lost a peer waits before exiting: far longer than the agent's 0.1 s monitoring.
LINGER = timedelta(seconds=3)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Group:
    """This process's place in the run: the collectives generation needs (comm), and the set-up
    exchanges across every rank, which wait up to SETUP_TIMEOUT."""

    rank: int  # global: stage * tp + tp_rank
    world_size: int
    device: torch.device
    setup: dist.ProcessGroup  # waiting for every rank to load its shard, gathering reports
    comm: Collectives  # the generation's collectives, with STEP_TIMEOUT
    grid: ParallelDims
    peers: list[tuple[str, int]]  # every rank's (node, pid)
    comm_name: str  # what runs the tensor-parallel collectives: shm, gloo or nccl

    @property
    def stage(self) -> int:
        return self.grid.coordinates(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.grid.coordinates(self.rank)[1]

    def barrier(self) -> None:
        """Wait for every rank, for up to SETUP_TIMEOUT: before the first step, whose clock is shorter."""
        try:
            dist.barrier(group=self.setup)
        except RuntimeError as e:
            raise lost_peer(e) from None

    def gather_to_rank0(self, obj: object) -> list | None:
        """Every rank's obj (any picklable value), in rank order, on rank 0 (None elsewhere)."""
        gathered = [None] * self.world_size if self.rank == 0 else None
        try:
            dist.gather_object(obj, gathered, dst=0, group=self.setup)
        except RuntimeError as e:
            raise lost_peer(e) from None
        return gathered


def started_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


@dataclass(frozen=True)
class RunSpec:
    """How the ranks of a run are set up (pickled to each worker)."""

    device: str  # cpu or cuda
    grid: ParallelDims
    spread_tp: bool = False  # allow a tensor-parallel group across nodes
    comm: str = "auto"  # the tensor-parallel collectives: auto, shm or gloo (comm/choose.py)


def run(
    fn: Callable[..., None],
    args: tuple,
    *,
    nproc: int,
    device: str,
    grid: ParallelDims | None = None,
    spread_tp: bool = False,
    comm: str = "auto",
) -> None:
    """Run fn(group, *args) on nproc ranks: in this process when torchrun started it (one rank of its
    group), else in nproc worker processes started here. device: "cpu" (gloo) or "cuda" (NCCL, rank
    r on cuda:LOCAL_RANK). grid: the ranks' tp x pp grid (default: nproc tensor-parallel ranks).
    spread_tp: allow a tensor-parallel group across nodes. comm: auto, shm or gloo. Raises
    TpshardError naming the failing rank when any rank fails."""
    spec = RunSpec(device, grid or ParallelDims(nproc), spread_tp, comm)
    if spec.grid.world_size != nproc:
        raise ValueError(f"a grid of {spec.grid.world_size} ranks run on {nproc} processes")
    if device not in ("cpu", "cuda"):
        raise TpshardError(f"--device {device}: distributed runs take cpu or cuda (each rank uses cuda:LOCAL_RANK)")
    if comm not in KINDS:
        raise TpshardError(f"--comm {comm}: choose one of {', '.join(KINDS)}")
    if started_by_torchrun():
        _check_world(spec.grid)
        _rank_main(fn, args, spec, error_dir=None)
    else:
        _launch(fn, args, spec)


def _check_world(grid: ParallelDims) -> None:
    world = int(os.environ["WORLD_SIZE"])
    if world != grid.world_size:
        layout = f"tp {grid.tp} x pp {grid.pp}" if grid.pp > 1 else f"tp {grid.tp}"
        raise TpshardError(
            f"torchrun started {world} processes but this run needs {grid.world_size} (one per shard rank, {layout})"
        )


# --- in each rank ---------------------------------------------------------------------------------


def _rank_main(fn: Callable[..., None], args: tuple, spec: RunSpec, error_dir: str | None) -> None:
    """One rank: join the group, run fn, leave. A failure is raised as one TpshardError line (under
    torchrun) or written for the launching parent, which reports it (under tpshard's own launch).
    Ctrl-C is left to the caller."""
    rank = int(os.environ["RANK"])
    group = None
    try:
        group = _init_group(spec)
        fn(group, *args)
        dist.destroy_process_group()  # not after a failure: the process exits, and a peer may be gone
    except Exception as e:
        message = str(e) if isinstance(e, TpshardError) else f"{type(e).__name__}: {e}"
        message = " ".join(message.split())
        cause = not isinstance(e, LostPeer)
        stopped = _kill_stopped_peers(group) if isinstance(e, LostPeer) and group is not None else []
        if stopped:  # the peer this rank waited for: name it
            rank, cause = stopped[0], True
            message = "stopped answering (its process was stopped, as by SIGSTOP): killed; every rank stopped"
        if error_dir is None:
            raise TpshardError(f"rank {rank}: {message}") from None
        report = {"rank": rank, "message": message, "cause": cause, "time": time.time()}
        # whole or not at all: the agent may kill this rank mid-write, and the parent reads every report
        partial = Path(error_dir, f".rank{rank}.json.partial")
        partial.write_text(json.dumps(report))
        os.replace(partial, partial.with_name(f"rank{rank}.json"))
        if not cause:  # the launcher reports the first rank to exit: let it see the one that died
            time.sleep(LINGER.total_seconds())  # (it stops this one meanwhile)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # now: interpreter teardown would wait for any collective left pending with a lost peer


def _kill_stopped_peers(group: Group) -> list[int]:
    """The ranks on this node whose process is stopped (state T: SIGSTOP, a debugger), killed. The
    agent would send them SIGTERM, which a stopped process does not act on, and wait 30 s before
    SIGKILL (torch 2.13's failure path); a running one, however stuck, ends on SIGTERM."""
    me = group.peers[group.rank][0]
    stopped = []
    for rank, (node, pid) in enumerate(group.peers):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if node == me and rank != group.rank and state in ("T", "t"):
            os.kill(pid, signal.SIGKILL)
            stopped.append(rank)
    return stopped


def _init_group(spec: RunSpec) -> Group:
    device, grid = spec.device, spec.grid
    rank, world, local_rank = (int(os.environ[name]) for name in TORCHRUN_ENV)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise TpshardError(f"--device cuda: rank {rank} needs cuda:{local_rank}, {torch.cuda.device_count()} found")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        _join("nccl", rank, world, device_id=where)
        poll = False
    else:
        where = torch.device("cpu")
        from tpshard.runtime.threads import available_cpus, set_threads

        cpus = available_cpus()
        set_threads(None, local_world)  # OMP_NUM_THREADS (torchrun's, or the CLI's rule for the model), else a share
        _join("gloo", rank, world)
        poll = local_world <= cpus  # polling a core away from another rank's compute would be slower than blocking
    # STEP_TIMEOUT is also how long a rank's exit may wait for a collective left pending (gloo's
    # process group waits for them when it is destroyed)
    setup, steps = dist.new_group(timeout=SETUP_TIMEOUT), dist.new_group(timeout=STEP_TIMEOUT)
    peers = _peers(setup, world)
    if not spec.spread_tp:
        _check_nodes(grid, [node for node, _ in peers])
    if grid.pp == 1:
        comm, name = open_collectives(spec.comm, setup, steps, rank, world, where, poll)
        return Group(rank, world, where, setup, comm, grid, peers, name)
    stage, tp_rank = grid.coordinates(rank)
    mine: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
    for s in range(grid.pp):  # every rank takes part in creating every group, in the same order
        members = grid.tp_group(grid.rank(s, 0))
        created = dist.new_group(members, timeout=SETUP_TIMEOUT), dist.new_group(members, timeout=STEP_TIMEOUT)
        mine = created if s == stage else mine
    assert mine is not None
    members = grid.tp_group(rank)
    tp, name = open_collectives(spec.comm, *mine, tp_rank, grid.tp, where, poll, group_ranks=members)
    comm = PipelineCollectives(tp, steps, grid, rank, where, poll)
    return Group(rank, world, where, setup, comm, grid, peers, name)


def _peers(setup: dist.ProcessGroup, world: int) -> list[tuple[str, int]]:
    """Every rank's (node, pid). A node is torchrun's GROUP_RANK (one per agent, which is what two
    agents on one host standing in for two nodes need), else the host name."""
    mine = (os.environ.get("GROUP_RANK") or socket.gethostname(), os.getpid())
    peers: list = [None] * world
    try:
        dist.all_gather_object(peers, mine, group=setup)
    except RuntimeError as e:
        raise lost_peer(e) from None
    return peers


def _check_nodes(grid: ParallelDims, nodes: list[str]) -> None:
    """Refuse a tensor-parallel group whose ranks are on different nodes: its two collectives per
    layer would cross the network."""
    for stage in range(grid.pp):
        members = grid.tp_group(grid.rank(stage, 0))
        where = {nodes[r] for r in members}
        if len(where) > 1:
            raise TpshardError(
                f"stage {stage}'s tensor-parallel group (ranks {members[0]}-{members[-1]}) spans {len(where)} nodes: "
                f"its 2 collectives per layer would cross the network; use --nproc-per-node a multiple of tp "
                f"{grid.tp}, or pass --spread-tp to run it anyway"
            )


def _join(backend: str, rank: int, world: int, **options: object) -> None:
    """Join the group through the store at MASTER_ADDR:MASTER_PORT (torchrun's agent hosts it, or else
    rank 0), giving up soon when it does not answer; then wait up to SETUP_TIMEOUT for the other ranks."""
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    hosted_by_rank0 = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        store = dist.TCPStore(
            address, port, world, is_master=hosted_by_rank0, timeout=CONNECT_TIMEOUT, wait_for_workers=False
        )
    except (RuntimeError, TimeoutError) as e:  # DistNetworkError, DistStoreError are RuntimeErrors
        first = first_line(e, 160) or type(e).__name__
        raise TpshardError(
            f"could not reach the rendezvous store at {address}:{port} ({first}); "
            "check MASTER_ADDR / MASTER_PORT and that the store's host (rank 0, or torchrun) is running"
        ) from None
    store.set_timeout(SETUP_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=SETUP_TIMEOUT, **options)


def _worker(fn: Callable[..., None], args: tuple, spec: RunSpec, error_dir: str) -> None:
    """The entrypoint of a worker process started by _launch."""
    _die_with_parent()
    # Ctrl-C reaches every rank, and the agent forwards it once more: leave at once, quietly (the
    # parent reports the interruption)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    _rank_main(fn, args, spec, error_dir)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its launcher dies, so even a killed launcher leaves no
    orphan (the agent stops the workers in every other case)."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _loopback_interface() -> str:
    names = {name for _, name in socket.if_nameindex()}
    return "lo0" if "lo0" in names and "lo" not in names else "lo"  # macOS names it lo0


# --- in the launching process ---------------------------------------------------------------------


def _launch(fn: Callable[..., None], args: tuple, spec: RunSpec) -> None:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc, device = spec.grid.world_size, spec.device
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise TpshardError(
            f"--device cuda: {nproc} ranks need {nproc} CUDA devices, one each; {torch.cuda.device_count()} found"
        )
    with tempfile.TemporaryDirectory(prefix="tpshard-launch-") as tmp:
        errors = Path(tmp, "errors")
        errors.mkdir()
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # port 0: the store binds a free port, no race
            rdzv_configs={"is_host": True, "timeout": int(SETUP_TIMEOUT.total_seconds())},
            local_addr="127.0.0.1",  # the workers' MASTER_ADDR: loopback only
            max_restarts=0,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp, "logs"))),
            shutdown_timeout=2,  # SIGTERM, then SIGKILL 2 s later
        )
        logging.disable(logging.ERROR)  # the agent logs every failure with a traceback; we report one line
        try:
            elastic_launch(config, _worker)(fn, args, spec, str(errors))
        except ChildFailedError as e:
            raise _first_failure(errors, e.failures) from None
        except SignalException as e:
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise TpshardError(f"stopped by {signal.Signals(e.sigval).name}; every rank was stopped") from None
        except Exception as e:  # the launcher itself failed (rendezvous, spawning)
            raise TpshardError(f"could not start the ranks: {type(e).__name__}: {e}") from None
        finally:
            logging.disable(logging.NOTSET)


def _first_failure(errors: Path, failures: dict) -> TpshardError:
    """The cause, in this order: an error a rank reported itself (the earliest); a rank that died
    without reporting (killed, crashed); a rank that only lost contact with the others."""
    reports = sorted((json.loads(p.read_text()) for p in errors.glob("rank*.json")), key=lambda r: r["time"])
    causes = [r for r in reports if r["cause"]]
    if causes:
        return TpshardError(f"rank {causes[0]['rank']}: {causes[0]['message']}")
    reported = {r["rank"] for r in reports}
    for rank, failure in sorted(failures.items()):
        if rank not in reported:
            how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            return TpshardError(f"rank {rank}: died without reporting an error ({how}); every rank was stopped")
    if reports:
        return TpshardError(f"rank {reports[0]['rank']}: {reports[0]['message']}")
    return TpshardError("a rank failed without reporting an error; every rank was stopped")
