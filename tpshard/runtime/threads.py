"""How many threads a tpshard process computes with: one rule, for the CLI (dense, simulated, and the
ranks it launches) and for every rank (runtime/launch.py).

    --threads N (the CLI)  >  OMP_NUM_THREADS (torchrun sets it to 1)  >  default_threads(model)

A decode step is a few hundred small operations; on more than one thread, many of them are parallel
regions, each ending at a barrier that waits for the slowest thread. On a core another process keeps
busy, that thread may not be running at all, and torch's OpenMP threads spin while they wait, taking
CPU from the rest: then two threads decode several times slower than one. Measured on this project's 2-core machine
(decode tokens/s, 1 thread / 2 threads, in one process, alternating; README "Threads"):

    idle machine       char sample (0.8M parameters) 758 / 750; 3.4M 558 / 616; 5.8M 306 / 366;
                       29M 101 / 137; GPT-2 124M 32-34 / 43-51
    busy machine       char sample 725 / 398 (282 / 9 under a heavier load); GPT-2 124M 20-32 / 4-13

So: one thread for a model of under SMALL_MODEL parameters per process (two gain at most 10% on an
idle machine, and lose up to 30x on a busy one); else the CPUs that are idle now (free_cpus), shared
among this machine's processes of the run. A model not known (a rank of a group launched without
OMP_NUM_THREADS) gets its share of the CPUs, as torchrun gives it.
"""

import math
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError
from tpshard.parallel import plan

SMALL_MODEL = 5_000_000  # parameters per process: below, one thread
IDLE_SAMPLE = 0.15  # seconds over which free_cpus watches the CPUs
_last_sample: tuple[float, int] = (-1e9, 0)  # (when, free CPUs): free_cpus is asked twice per run


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_cpus() -> int:
    """How many of the available CPUs sat idle over the last IDLE_SAMPLE seconds (at least 1): their
    idle fractions from /proc/stat, summed and rounded (a CPU 70% idle counts). Linux; elsewhere, and
    when /proc/stat cannot be read, available_cpus()."""
    global _last_sample
    when, free = _last_sample
    if time.monotonic() - when < 1.0:
        return free
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        before = _cpu_times(cpus)
        time.sleep(IDLE_SAMPLE)
        after = _cpu_times(cpus)
    except (OSError, ValueError):
        return available_cpus()
    idle = 0.0
    for cpu, (total, idle_ticks) in after.items():
        was_total, was_idle = before.get(cpu, (total, idle_ticks))
        idle += (idle_ticks - was_idle) / (total - was_total) if total > was_total else 1.0
    free = max(1, min(available_cpus(), int(idle + 0.3)))
    _last_sample = (time.monotonic(), free)
    return free


def _cpu_times(cpus: set[int] | None) -> dict[int, tuple[int, int]]:
    """{cpu: (all ticks, idle + iowait ticks)} of the given CPUs (all: None), from /proc/stat."""
    found = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *fields = line.split()
                cpu, ticks = int(name[3:]), [int(x) for x in fields[:8]]  # user nice system idle iowait ... steal
                if cpus is None or cpu in cpus:
                    found[cpu] = (sum(ticks), ticks[3] + ticks[4])
    return found


def parameters(config: GPTConfig, processes: int = 1) -> int:
    """A model's parameters (the tied output layer once), per process when split across `processes`."""
    return sum(map(math.prod, plan.dense_shapes(config).values())) // max(1, processes)


def default_threads(params: int | None, processes: int = 1) -> int:
    """The rule (see the module's docstring) for a process holding `params` parameters, one of
    `processes` on this machine; params None: not known, a share of the available CPUs."""
    if params is None:
        return max(1, available_cpus() // max(1, processes))
    if params < SMALL_MODEL:
        return 1
    return max(1, free_cpus() // max(1, processes))


def chosen_threads(params: int | None, processes: int = 1, explicit: int | None = None) -> int:
    """explicit (--threads), else OMP_NUM_THREADS when it is a positive number, else default_threads."""
    if explicit is not None:
        return explicit
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return default_threads(params, processes)


def set_threads(params: int | None, processes: int = 1, explicit: int | None = None) -> int:
    """Set this process's torch threads by the rule; returns the count."""
    threads = chosen_threads(params, processes, explicit)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@contextmanager
def for_workers(params: int | None, processes: int, explicit: int | None = None) -> Iterator[int]:
    """Worker processes started inside the block (the ranks of a distributed run, each holding
    `params`, `processes` of them on this machine) get the rule's threads through OMP_NUM_THREADS in
    the environment they inherit, as torchrun passes it; an OMP_NUM_THREADS already set is left as it is
    (unless explicit). The environment is restored after."""
    threads = chosen_threads(params, processes, explicit)
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


@contextmanager
def for_run(config: GPTConfig | None, ranks: int = 1, explicit: int | None = None) -> Iterator[int]:
    """The threads of a run of config's model (None: not known), for the block: this process's for the
    whole model (dense, simulated), and, for the `ranks` processes a distributed run starts inside the
    block, each rank's for its share (LOCAL_WORLD_SIZE of them on this machine, under torchrun). The
    thread count and the environment are restored after. Returns this process's count."""
    before = torch.get_num_threads()
    threads = set_threads(parameters(config) if config else None, 1, explicit)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    try:
        with for_workers(parameters(config, ranks) if config else None, local, explicit):
            yield threads
    finally:
        torch.set_num_threads(before)


def for_shard_set(directory: str | Path, distributed: bool, explicit: int | None = None) -> AbstractContextManager[int]:
    """for_run for a shard set's model (unknown when the set cannot be opened: its run says why)."""
    from tpshard.files.shardset import ShardSet

    try:
        manifest = ShardSet.open(directory).manifest
    except TpshardError:
        return for_run(None, 1, explicit)
    return for_run(manifest.config, manifest.grid.world_size if distributed else 1, explicit)
