"""Collectives' latency at GPT-2 124M's decode shapes: shared memory (tpshard.comm.shm) against gloo
over loopback (tpshard.comm.process_group, polling as distributed runs do), side by side in one run of
2 CPU ranks.

    python benchmarks/bench_comm.py                 5 repetitions of 300 calls per collective
    python benchmarks/bench_comm.py --reps 9 --calls 1000

    reduce_partials   [1, 1, 1, 768] fp32       after each row-parallel layer: 2 per block
    gather_logits     [1, 1, 50304 // 2] fp32   the vocab-parallel output layer, once a token
    broadcast_token   [1] int64                 the picked token, once a token

Each repetition times every call on its own (both ranks start each block together, after a barrier)
and keeps the median; the table shows the median of the repetitions' medians, in µs per call, and
gloo's time over shm's. The machine may be shared: the load average is printed; run it twice before
believing a ratio.
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from tpshard.comm.process_group import STEP_TIMEOUT, ProcessGroupCollectives
from tpshard.comm.shm import SharedMemoryCollectives
from tpshard.runtime.launch import run

CASES = {
    "reduce_partials [1,1,768] fp32": ("reduce_partials", lambda: torch.randn(1, 1, 1, 768)),
    "gather_logits [1,1,25152] fp32": ("gather_logits", lambda: torch.randn(1, 1, 50304 // 2)),
    "broadcast_token [1] int64": ("broadcast_token", lambda: torch.tensor([1234])),
}
WARMUP = 50


def rank_main(group, reps: int, calls: int) -> None:
    cpus = len(os.sched_getaffinity(0))
    steps = dist.new_group(timeout=STEP_TIMEOUT)
    impls = {
        "shm": SharedMemoryCollectives(group.setup, group.rank, group.world_size),
        "gloo": ProcessGroupCollectives(
            steps, group.rank, group.world_size, torch.device("cpu"), group.world_size <= cpus
        ),
    }
    medians = {(case, impl): [] for case in CASES for impl in impls}
    for _ in range(reps):
        for case, (method, make) in CASES.items():
            for name, comm in impls.items():  # alternating, so that a change in load hits both
                medians[case, name].append(statistics.median(timed(getattr(comm, method), make(), calls)) * 1e6)
    if group.rank == 0:
        print(f"2 ranks, {cpus} CPUs, load average {os.getloadavg()[0]:.2f}; {reps} x {calls} calls, µs per call")
        print(f"{'':32} {'shm':>8} {'gloo':>8} {'gloo/shm':>9}")
        for case in CASES:
            shm, gloo = (statistics.median(medians[case, name]) for name in impls)
            print(f"{case:32} {shm:8.1f} {gloo:8.1f} {gloo / shm:8.1f}x")
        spread = {name: [round(m) for m in medians[next(iter(CASES)), name]] for name in impls}
        print(f"reduce_partials per repetition: {spread}")


def timed(call, x: torch.Tensor, calls: int) -> list[float]:
    for _ in range(WARMUP):
        call(x)
    dist.barrier()
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        call(x)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    run(rank_main, (args.reps, args.calls), nproc=2, device="cpu")


if __name__ == "__main__":
    main()
