"""Pipeline stages: decode speed, time between stages and memory per rank, dense vs tp 2 vs tp 1 x pp 2 vs
tp 2 x pp 2, fp32 on CPU, in one run.

    python benchmarks/bench_pipeline.py            GPT-2 124M shape (12 layers, 768 wide, vocab 50304)
    python benchmarks/bench_pipeline.py --quick    a small model, a smoke test in seconds

Weights are random; decoding is greedy; each figure is the median over --reps samples after a
warm-up. Distributed runs are started as the CLI starts them (tpshard.runtime.launch, --comm auto).
Then every rank's peak RSS against a bare `import torch` process's RSS plus 1.1x its shard file.

Decoding one sequence cannot overlap the stages: stage 1 waits for stage 0's activations, stage 0 for
the token the last stage picks. A pipeline buys memory (each rank holds 1/P of the blocks) and reach
(stages on different hosts), not speed. On this 2-core machine tp 2 x pp 2 runs 4 processes on 2
cores: the ranks take turns on the cores, and the collectives block instead of polling.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tpshard.convert import split_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling
from tpshard.model import GPT
from tpshard.parallel.grid import ParallelDims
from tpshard.runtime import launch
from tpshard.runtime.models import dense_model, distributed_model
from tpshard.runtime.programs import peak_rss_bytes

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import FULL, QUICK, make_checkpoint, torch_baseline_rss

GRIDS = {"tp 2": (2, 1), "tp 1 x pp 2": (1, 2), "tp 2 x pp 2": (2, 2)}


def measure(model: GPT, settings: dict) -> dict:
    """Median decode tokens/s, and the time in collectives and between stages per token."""
    vocab = settings["config"].vocab_size
    prompt = torch.randint(vocab, (settings["prompt"],), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for rep in range(settings["reps"] + 1):
        runner = Runner(model, Sampling(greedy=True))
        comm, p2p = model.comm.seconds, model.comm.p2p_seconds
        for _ in runner.sample(prompt, 8 if rep == 0 else settings["new_tokens"]):
            pass
        stats = runner.stats()
        if rep:  # rep 0 warms up
            tokens = stats.new_tokens
            rows.append(
                (
                    (tokens - 1) / stats.decode_seconds,
                    (stats.comm_seconds - comm) / tokens,
                    (stats.p2p_seconds - p2p) / tokens,
                )
            )
    return {
        "decode_tps": statistics.median(r[0] for r in rows),
        "comm_ms_per_token": 1e3 * statistics.median(r[1] for r in rows),
        "p2p_ms_per_token": 1e3 * statistics.median(r[2] for r in rows),
    }


def distributed_rank(group: launch.Group, shards: ShardSet, settings: dict, out: str) -> None:
    model = distributed_model(shards, group)
    result = measure(model, settings)
    ranks = group.gather_to_rank0((group.stage, peak_rss_bytes(), shards.manifest.files[group.rank]["bytes"]))
    if group.rank == 0:
        Path(out).write_text(json.dumps({**result, "ranks": ranks, "comm": group.comm_name}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model instead of GPT-2 124M's shape")
    parser.add_argument("--reps", type=int, help="samples measured per runtime (median reported)")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    settings["reps"] = args.reps or settings["reps"]
    with tempfile.TemporaryDirectory(prefix="tpshard-bench-pp-") as tmp_name:
        tmp = Path(tmp_name)
        dense = make_checkpoint(settings["config"], tmp)
        torch.set_num_threads(2)
        results = {"dense (2 threads)": measure(dense_model(dense), settings)}
        for label, (tp, pp) in GRIDS.items():
            split_checkpoint(dense, tp, tmp / label, pp=pp)
            shards = ShardSet.open(tmp / label)
            grid = ParallelDims(tp, pp)
            out = tmp / f"{label}.json"
            launch.run(distributed_rank, (shards, settings, str(out)), nproc=grid.world_size, device="cpu", grid=grid)
            results[f"{label} ({grid.world_size} processes)"] = json.loads(out.read_text())
        baseline = torch_baseline_rss()
    config = settings["config"]
    print(
        f"\n{'quick model' if args.quick else 'GPT-2 124M shape'}: {config.n_layer} layers, {config.n_embd} wide, "
        f"vocab {config.vocab_size}, fp32, torch {torch.__version__}, {os.cpu_count()} CPUs; prompt "
        f"{settings['prompt']} tokens, {settings['new_tokens']} new tokens, median of {settings['reps']}"
    )
    dense_tps = results["dense (2 threads)"]["decode_tps"]
    header = f"{'comm':>7}{'decode tok/s':>14}{'x dense':>9}{'collectives/tok':>17}{'between stages/tok':>20}"
    print(f"{'runtime':34}{header}")
    for label, r in results.items():
        comm = r.get("comm", "-")
        coll, p2p = (f"{r[k]:.2f} ms" if "ranks" in r else "-" for k in ("comm_ms_per_token", "p2p_ms_per_token"))
        tps = r["decode_tps"]
        print(f"{label:34}{comm:>7}{tps:14.1f}{tps / dense_tps:8.2f}x{coll:>17}{p2p:>20}")
    print(f"\npeak RSS per rank, against a bare `import torch` process ({baseline / 2**20:.0f} MiB) + 1.1 x its shard")
    print(f"{'runtime':34}{'rank':>5}{'stage':>6}{'shard file':>12}{'peak RSS':>10}{'limit':>10}")
    for label, r in results.items():
        for rank, (stage, rss, shard) in enumerate(r.get("ranks", [])):
            limit = baseline + 1.1 * shard
            mib = [f"{n / 2**20:.0f} MiB" for n in (shard, rss, limit)]
            verdict = "ok" if rss <= limit else "over"
            print(f"{label:34}{rank:5}{stage:6}{mib[0]:>12}{mib[1]:>10}{mib[2]:>10} {verdict}")


if __name__ == "__main__":
    main()
