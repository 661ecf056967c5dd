"""Inference speed and memory: dense vs simulated vs distributed tensor parallelism, fp32 on CPU, in one run.

    python benchmarks/bench_inference.py                  GPT-2 124M shape: 12 layers, 12 heads, 768 wide,
                                                          vocab 50304, block 1024 (~1.5 GB of temp files)
    python benchmarks/bench_inference.py --quick          a small model, a smoke test in seconds
    python benchmarks/bench_inference.py --collectives    only the gloo collective latencies

Weights are random (a forward's speed does not depend on them); decoding is greedy. For each runtime:
the latency of a 256-token prefill and the decode speed, the median over --reps samples after a warm-up.

    dense         the checkpoint, 2 threads
    simulated     the tp 2 shard set in this process, 2 threads
    distributed   the tp 2 shard set, 2 processes x 1 thread, started by tpshard.launch as the CLI does:
                  --comm auto (shared memory here), and --comm gloo as the baseline row

Then each distributed rank's peak RSS against a bare `import torch` process's RSS plus 1.1x its shard
file. Targets: simulated at most 1.1x dense time; distributed (shm) decode at least 1.3x dense
tokens/s; the median sync point at most 50 us.
On a shared machine the numbers are noisy: run it twice before believing a ratio.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.files.checkpoint import Checkpoint, model_args
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling
from tpshard.model import GPT
from tpshard.parallel.plan import dense_shapes
from tpshard.runtime import launch
from tpshard.runtime.models import dense_model, distributed_model, simulated_model
from tpshard.runtime.programs import peak_rss_bytes
from tpshard.testing import random_weights

FULL = dict(config=GPTConfig(), prompt=256, new_tokens=128, reps=3)
QUICK = dict(config=GPTConfig(block_size=512, vocab_size=8192, n_layer=4, n_head=4, n_embd=256), prompt=128,
             new_tokens=32, reps=2)  # fmt: skip
TP = 2
THREADS = 2


# --- measuring one runtime ------------------------------------------------------------------------


def measure(model: GPT, settings: dict) -> dict:
    """Median prefill latency and decode speed over settings['reps'] greedy samples, after a warm-up."""
    vocab = settings["config"].vocab_size
    prompt = torch.randint(vocab, (settings["prompt"],), generator=torch.Generator().manual_seed(0))
    results = []
    for rep in range(settings["reps"] + 1):
        if isinstance(model.comm, CountingCollectives):
            model.comm.reset()
            model.comm.inner.seconds = 0.0
        runner = Runner(model, Sampling(greedy=True))
        for _ in runner.sample(prompt.tolist(), 8 if rep == 0 else settings["new_tokens"]):
            pass
        if rep:  # rep 0 warms up: first-touch of the weights, allocator, thread pools
            results.append(runner.stats())
    decode_seconds = statistics.median(s.decode_seconds / (s.new_tokens - 1) for s in results)
    return {
        "prefill_ms": 1e3 * statistics.median(s.prefill_seconds for s in results),
        "decode_tps": 1 / decode_seconds,
        "comm_ms_per_token": 1e3 * statistics.median(s.comm_seconds / s.new_tokens for s in results),
        "sync_median_us": 1e6 * statistics.median(s.sync_median_seconds for s in results),
        "syncs_per_token": results[-1].sync_points / results[-1].forwards,
    }


def distributed_rank(group: launch.Group, shards: ShardSet, settings: dict, out: str) -> None:
    model = distributed_model(shards, group)
    result = measure(model, settings)
    ranks = group.gather_to_rank0((peak_rss_bytes(), shards.manifest.files[group.rank]["bytes"]))
    if group.rank == 0:
        Path(out).write_text(json.dumps({**result, "ranks": ranks}))


def torch_baseline_rss() -> int:
    """Peak RSS of a process that only imports torch (VmHWM, as runtime.programs.peak_rss_bytes reads it; Linux)."""
    code = "import torch; print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if 'VmHWM' in l))"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# --- collectives ----------------------------------------------------------------------------------


def collectives_rank(group: launch.Group, out: str, calls: int) -> None:
    """Latency of each way to add one token's activations (768 floats) across the ranks: back to back,
    and between ~1 ms matmuls as in a forward (a waiting rank idles its core)."""
    x = torch.randn(1, 1, 768)
    weight, v = torch.randn(3072, 1536), torch.randn(1, 1536)
    W, r = group.world_size, group.rank

    def all_reduce():
        y = x.clone()
        dist.all_reduce(y)
        return y

    def all_gather_blocking():
        parts = x.new_empty((W, *x.shape))
        dist.all_gather_single(parts.view(-1), x.view(-1))
        return parts.sum(0)

    def isend_irecv():
        parts = x.new_empty((W, *x.shape))
        parts[r] = x
        works = []
        for peer in range(W):
            if peer != r:
                works += [dist.isend(x, peer), dist.irecv(parts[peer], peer)]
        for work in works:
            work.wait(timedelta(seconds=10))
        return parts.sum(0)

    ways = {
        "all_reduce": all_reduce,
        "all_gather_single, blocking wait": all_gather_blocking,
        "isend/irecv with each peer": isend_irecv,
        "all_gather_single, polled (tpshard)": lambda: group.comm.reduce_partials(x[None]),
        "broadcast of the token (tpshard)": lambda: group.comm.broadcast_token(torch.zeros(1, dtype=torch.long)),
    }
    rows = []
    for between in (False, True):
        for name, way in ways.items():
            times = []
            for _ in range(calls // 10):
                way()  # warm-up
            dist.barrier()
            for _ in range(calls):
                if between:
                    torch.nn.functional.linear(v, weight)
                start = time.perf_counter()
                way()
                times.append(time.perf_counter() - start)
            q = statistics.quantiles(times, n=10)
            rows.append((name, between, statistics.mean(times), statistics.median(times), q[-1]))
    if r == 0:
        Path(out).write_text(json.dumps(rows))


def print_collectives(rows: list) -> None:
    print(f"gloo on loopback, {TP} processes x 1 thread, 768 floats (3 KiB) per call; ms per call")
    print(f"{'':38}{'back to back':>26}{'between 1 ms matmuls':>30}")
    print(f"{'':38}{'mean  median    p90':>26}{'mean  median    p90':>30}")
    for name in dict.fromkeys(row[0] for row in rows):
        alone, busy = (next(r for r in rows if r[0] == name and r[1] == b) for b in (False, True))
        widths = (13, 7, 6, 17, 7, 6)
        cells = "".join(f"{1e3 * v:{w}.2f}" for v, w in zip((*alone[2:], *busy[2:]), widths, strict=True))
        print(f"{name:38}{cells}")


def print_speed(results: dict[str, dict]) -> None:
    dense = results[DENSE]
    header = f"{'prefill':>10}{'x dense':>9}{'decode tok/s':>14}{'x dense':>9}{'syncs/tok':>11}{'comm/tok':>10}"
    print(f"{'runtime':44}{header}{'sync median':>13}")
    for label, r in results.items():
        comm = f"{r['comm_ms_per_token']:.1f} ms" if "ranks" in r else "-"
        sync = f"{r['sync_median_us']:.0f} us" if "ranks" in r else "-"
        prefill, decode = r["prefill_ms"], r["decode_tps"]
        print(
            f"{label:44}{prefill:7.0f} ms{prefill / dense['prefill_ms']:8.2f}x{decode:14.1f}"
            f"{decode / dense['decode_tps']:8.2f}x{r['syncs_per_token']:11.0f}{comm:>10}{sync:>13}"
        )


def print_memory(results: dict[str, dict], baseline: int) -> None:
    print(f"peak RSS per distributed rank, against a bare `import torch` process ({baseline / 2**20:.0f} MiB)")
    print(f"{'runtime':44}{'rank':>5}{'shard file':>12}{'peak RSS':>10}{'torch + 1.1 x shard':>21}")
    for label, r in results.items():
        for rank, (rss, shard_bytes) in enumerate(r.get("ranks", [])):
            limit = baseline + 1.1 * shard_bytes
            mib = [f"{n / 2**20:.0f} MiB" for n in (shard_bytes, rss, limit)]
            print(f"{label:44}{rank:5}{mib[0]:>12}{mib[1]:>10}{mib[2]:>14} {'ok' if rss <= limit else 'over':>6}")


def check_targets(results: dict[str, dict]) -> None:
    dense, sim = results[DENSE], results[SIMULATED]
    sim_time = max(sim["prefill_ms"] / dense["prefill_ms"], dense["decode_tps"] / sim["decode_tps"])
    print(f"target: simulated at most 1.1x dense time: {sim_time:.2f}x {'ok' if sim_time <= 1.1 else 'MISSED'}")
    for label in (DISTRIBUTED, DISTRIBUTED_VOCAB):
        speed = results[label]["decode_tps"] / dense["decode_tps"]
        verdict = "ok" if speed >= 1.3 else "MISSED"
        print(f"target: {label} decode at least 1.3x dense tokens/s: {speed:.2f}x {verdict}")
    sync = results[DISTRIBUTED]["sync_median_us"]
    print(f"target: {DISTRIBUTED} median sync point at most 50 us: {sync:.0f} us {'ok' if sync <= 50 else 'MISSED'}")


# --- the run ------------------------------------------------------------------------------------

DENSE = f"dense ({THREADS} threads)"
SIMULATED = f"simulated tp {TP} ({THREADS} threads)"
DISTRIBUTED = f"distributed tp {TP} ({TP} proc x 1 thread, shm)"
DISTRIBUTED_VOCAB = f"distributed tp {TP}, --vocab-parallel split, shm"
DISTRIBUTED_GLOO = f"distributed tp {TP}, --comm gloo (baseline)"


def make_checkpoint(config: GPTConfig, tmp: Path) -> Checkpoint:
    ckpt = {"model": random_weights(GPT(config)).state_dict(), "model_args": model_args(config), "config": {}}
    torch.save(ckpt, tmp / "ckpt.pt")
    return load_checkpoint(tmp / "ckpt.pt")


def run_distributed(shards: ShardSet, settings: dict, tmp: Path, comm: str = "shm") -> dict:
    launch.run(distributed_rank, (shards, settings, str(tmp / "dist.json")), nproc=TP, device="cpu", comm=comm)
    return json.loads((tmp / "dist.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model instead of GPT-2 124M's shape")
    parser.add_argument("--collectives", action="store_true", help="only the collective latencies")
    parser.add_argument("--reps", type=int, help="samples measured per runtime (median reported)")
    parser.add_argument("--new-tokens", type=int, help="tokens decoded per sample")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    settings["reps"] = args.reps or settings["reps"]
    settings["new_tokens"] = args.new_tokens or settings["new_tokens"]
    config = settings["config"]

    with tempfile.TemporaryDirectory(prefix="tpshard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        calls = 300 if args.quick else 1000  # gloo's ways (benchmarks/bench_comm.py holds shm against gloo)
        launch.run(collectives_rank, (str(tmp / "coll.json"), calls), nproc=TP, device="cpu", comm="gloo")
        print()
        print_collectives(json.loads((tmp / "coll.json").read_text()))
        if args.collectives:
            return
        dense = make_checkpoint(config, tmp)
        split_checkpoint(dense, TP, tmp / "tp")
        split_checkpoint(dense, TP, tmp / "tp-vocab", vocab_parallel=True)
        torch.set_num_threads(THREADS)
        results = {DENSE: measure(dense_model(dense), settings)}
        results[SIMULATED] = measure(simulated_model(ShardSet.open(tmp / "tp")), settings)
        results[DISTRIBUTED] = run_distributed(ShardSet.open(tmp / "tp"), settings, tmp)
        results[DISTRIBUTED_VOCAB] = run_distributed(ShardSet.open(tmp / "tp-vocab"), settings, tmp)
        results[DISTRIBUTED_GLOO] = run_distributed(ShardSet.open(tmp / "tp"), settings, tmp, comm="gloo")
        baseline = torch_baseline_rss()

    parameters = sum(map(math.prod, dense_shapes(config).values()))  # the tied lm_head counted once
    print(
        f"\n{'quick model' if args.quick else 'GPT-2 124M shape'}: {config.n_layer} layers, {config.n_head} heads, "
        f"{config.n_embd} wide, vocab {config.vocab_size} ({parameters / 1e6:.1f}M parameters), fp32, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; prompt {settings['prompt']} tokens, "
        f"{settings['new_tokens']} new tokens, median of {settings['reps']}"
    )
    print_speed(results)
    check_targets(results)
    print()
    print_memory(results, baseline)


if __name__ == "__main__":
    main()
