"""Sequence parallelism against tensor parallelism: the prefill of a long prompt, tp 2, distributed (two
processes, as `generate --mode distributed` runs them), in one run, side by side.

    python benchmarks/bench_sequence.py            GPT-2 124M shape, a 1024-token prompt
    python benchmarks/bench_sequence.py --quick    a small model, a smoke test in seconds
    python benchmarks/bench_sequence.py --comm gloo

For each schedule, alternating in every repetition (the machine is shared: ratios from the same run),
each rank measures

    prefill      the wall time of the prompt's forward through the KV cache (what generate's first
                 token waits for), on rank 0; median over --reps
    activations  the peak of the bytes torch allocates during that forward (the weights and the KV
                 cache were allocated before it), from torch.profiler's allocation events (every
                 allocation and free, with its time): one profiled forward per schedule and rank

Weights are random (seeded); both schedules give bit-identical logits (tests/test_sequence_parallel.py).
Targets (issue 14): activation peak per rank at most 0.6x tensor-parallel's, prefill at most 1.1x.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tpshard.convert import split_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT, KVCache
from tpshard.runtime import launch
from tpshard.runtime.models import distributed_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import FULL, QUICK, make_checkpoint

TP = 2
SCHEDULES = {"tensor-parallel": False, "sequence-parallel": True}


def prefill(model: GPT, prompt: torch.Tensor) -> None:
    """The prompt's forward as generation runs it: through a KV cache, logits of the last position."""
    cache = KVCache(model, prompt.size(0), capacity=prompt.size(1))
    with torch.inference_mode():
        model(prompt, cache, last_only=True)


def peak_allocated(model: GPT, prompt: torch.Tensor) -> int:
    """The most bytes torch held at once during one prefill, above what it held before: the KV cache,
    allocated before the forward starts, is not counted. From the profiler's raw allocation events; the
    aggregated op table attributes them to ops and loses their order."""
    cache = KVCache(model, prompt.size(0), capacity=prompt.size(1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.inference_mode():
        model(prompt, cache, last_only=True)
    cpu = torch.autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    held = peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak


def rank_main(group: launch.Group, shards: ShardSet, settings: dict, out: str) -> None:
    model = distributed_model(shards, group)
    config = shards.manifest.config
    prompt = torch.randint(config.vocab_size, (1, settings["prompt"]), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    peaks = {}
    for name, on in SCHEDULES.items():
        model.sequence_parallel = on
        prefill(model, prompt)  # warm-up
        peaks[name] = peak_allocated(model, prompt)
    for _ in range(settings["reps"]):
        for name, on in SCHEDULES.items():
            model.sequence_parallel = on
            group.barrier()  # both ranks start together: the time is the prefill's, not a wait for the other
            begin = time.perf_counter()
            prefill(model, prompt)
            times[name].append(time.perf_counter() - begin)
    gathered = group.gather_to_rank0(peaks)
    if group.rank == 0:
        medians = {name: statistics.median(t) for name, t in times.items()}
        result = {"peaks": gathered, "prefill": medians, "times": times, "comm": group.comm_name}
        Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model instead of GPT-2 124M's shape")
    parser.add_argument("--reps", type=int, default=7, help="prefills timed per schedule (median reported)")
    parser.add_argument("--prompt", type=int, help="prompt tokens [default: 1024, quick: 128]")
    parser.add_argument("--comm", default="auto", choices=["auto", "shm", "gloo"])
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    settings["prompt"] = args.prompt or (128 if args.quick else 1024)
    settings["reps"] = args.reps
    config = settings["config"]
    with tempfile.TemporaryDirectory(prefix="tpshard-bench-") as tmp:
        folder = Path(tmp)
        split_checkpoint(make_checkpoint(config, folder), TP, folder / "shards")
        shards = ShardSet.open(folder / "shards")
        out = folder / "result.json"
        launch.run(rank_main, (shards, settings, str(out)), nproc=TP, device="cpu", comm=args.comm)
        result = json.loads(out.read_text())
    shape = f"{config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size}"
    print(f"prefill of {settings['prompt']} tokens, tp {TP}, {shape}, fp32, collectives: {result['comm']}")
    print(f"{'schedule':<20} {'prefill ms':>11} {'ratio':>7} {'peak activations per rank':>34} {'ratio':>7}")
    base_time = result["prefill"]["tensor-parallel"]
    base_peak = max(p["tensor-parallel"] for p in result["peaks"])
    for name in SCHEDULES:
        ms = 1e3 * result["prefill"][name]
        peaks = [p[name] for p in result["peaks"]]
        per_rank = " / ".join(f"{p / 2**20:.1f}" for p in peaks) + " MiB"
        ratio = max(peaks) / base_peak
        print(f"{name:<20} {ms:>11.1f} {ms / 1e3 / base_time:>6.2f}x {per_rank:>34} {ratio:>6.2f}x")
    spread = {name: [round(1e3 * t, 1) for t in ts] for name, ts in result["times"].items()}
    print(f"prefill ms per repetition: {spread}")


if __name__ == "__main__":
    main()
