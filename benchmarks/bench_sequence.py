"""Sequence parallelism against tensor parallelism: the prefill of a long prompt, tp 2, distributed (two
processes, as `generate --mode distributed` runs them), in one run, side by side.

    python benchmarks/bench_sequence.py            GPT-2 124M shape, a 1024-token prompt
    python benchmarks/bench_sequence.py --quick    a small model, a smoke test in seconds
    python benchmarks/bench_sequence.py --comm gloo
    python benchmarks/bench_sequence.py --piece-rows 128     the trade-off of the pieces' size

Three schedules, alternating in every repetition (the machine is shared: ratios from the same run):

    tensor-parallel        the prompt's forward, the whole sequence at once (generate's prefill)
    sequence-parallel      the same with --sequence-parallel: each region a piece at a time
    tensor-parallel,       a reference, not a tpshard option: the prompt fed to the tensor-parallel
      chunked prefill      schedule as many positions per forward as sequence parallelism's pieces
                           hold (--piece-rows, or the transport's, at most a rank's chunk) through
                           the KV cache, which bounds any schedule's activations by the chunk (and
                           pays 2 all-reduces per block per chunk): what of the saving the pieces
                           alone give

For each, each rank measures

    prefill      the wall time of the prompt's forward(s) through the KV cache (what generate's first
                 token waits for), on rank 0; median over --reps, and the median of each repetition's
                 ratio to tensor-parallel's (the schedules run back to back in a repetition)
    activations  the peak of the bytes torch allocates during it (the weights and the KV cache were
                 allocated before it), from torch.profiler's allocation events (every allocation and
                 free, with its time): one profiled prefill per schedule and rank

Weights are random (seeded); the schedules' logits agree to fp32 rounding (tests/test_sequence_parallel.py).
Targets (issue 14): sequence-parallel's activation peak per rank at most 0.6x tensor-parallel's, its
prefill at most 1.1x.
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
# name: (sequence_parallel, positions per forward; None: the whole prompt in one)
SCHEDULES = {
    "tensor-parallel": (False, None),
    "sequence-parallel": (True, None),
    "tp, chunked prefill": (False, "piece_rows"),
}


def prefill(model: GPT, prompt: torch.Tensor, cache: KVCache, chunk: int | None) -> None:
    """The prompt's forward(s) as generation runs them: through a KV cache, logits of the last position;
    chunk positions at a time when given."""
    step = chunk or prompt.size(1)
    with torch.inference_mode():
        for first in range(0, prompt.size(1), step):
            model(prompt[:, first : first + step], cache, last_only=True)


def peak_allocated(model: GPT, prompt: torch.Tensor, chunk: int | None) -> int:
    """The most bytes torch held at once during one prefill, above what it held before: the KV cache,
    allocated before the forward starts, is not counted. From the profiler's raw allocation events; the
    aggregated op table attributes them to ops and loses their order."""
    cache = KVCache(model, prompt.size(0), capacity=prompt.size(1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prefill(model, prompt, cache, chunk)
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
    model.piece_rows = settings["piece_rows"]  # None: the transport's own
    # the positions of the sequence-parallel forward's pieces: the chunked prefill's, like for like
    pieces = {"piece_rows": min(model.piece_rows or model.comm.piece_rows, -(-settings["prompt"] // TP))}
    config = shards.manifest.config
    prompt = torch.randint(config.vocab_size, (1, settings["prompt"]), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    peaks = {}
    cache = KVCache(model, 1, capacity=prompt.size(1))
    for name, (on, chunk) in SCHEDULES.items():
        model.sequence_parallel, rows = on, pieces.get(chunk)
        prefill(model, prompt, cache, rows)  # warm-up
        cache.length = 0
        peaks[name] = peak_allocated(model, prompt, rows)
    for _ in range(settings["reps"]):
        for name, (on, chunk) in SCHEDULES.items():
            model.sequence_parallel, rows = on, pieces.get(chunk)
            cache.length = 0
            group.barrier()  # both ranks start together: the time is the prefill's, not a wait for the other
            begin = time.perf_counter()
            prefill(model, prompt, cache, rows)
            times[name].append(time.perf_counter() - begin)
    gathered = group.gather_to_rank0(peaks)
    if group.rank == 0:
        medians = {name: statistics.median(t) for name, t in times.items()}
        result = {"peaks": gathered, "prefill": medians, "times": times, "comm": group.comm_name} | pieces
        Path(out).write_text(json.dumps(result))


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: a whole number of positions, at least 1")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model instead of GPT-2 124M's shape")
    parser.add_argument("--reps", type=int, default=5, help="prefills timed per schedule (median reported)")
    parser.add_argument("--prompt", type=int, help="prompt tokens [default: 1024, quick: 128]")
    parser.add_argument("--comm", default="auto", choices=["auto", "shm", "gloo"])
    parser.add_argument("--piece-rows", type=positive, help="positions per piece [default: the transport's]")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    settings["prompt"] = args.prompt or (128 if args.quick else 1024)
    settings["reps"] = args.reps
    settings["piece_rows"] = args.piece_rows
    config = settings["config"]
    with tempfile.TemporaryDirectory(prefix="tpshard-bench-") as tmp:
        folder = Path(tmp)
        split_checkpoint(make_checkpoint(config, folder), TP, folder / "shards")
        shards = ShardSet.open(folder / "shards")
        out = folder / "result.json"
        launch.run(rank_main, (shards, settings, str(out)), nproc=TP, device="cpu", comm=args.comm)
        result = json.loads(out.read_text())
    shape = f"{config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size}"
    pieces = f"pieces of at most {result['piece_rows']} positions"
    print(f"prefill of {settings['prompt']} tokens, tp {TP}, {shape}, fp32, collectives: {result['comm']}, {pieces}")
    print(f"{'schedule':<20} {'prefill ms':>11} {'ratio':>7} {'peak activations per rank':>34} {'ratio':>7}")
    base_times = result["times"]["tensor-parallel"]
    base_peak = max(p["tensor-parallel"] for p in result["peaks"])
    for name in SCHEDULES:
        ms = 1e3 * result["prefill"][name]
        # each repetition runs the schedules back to back: the median of its ratios holds under a drifting load
        pace = statistics.median(t / base for t, base in zip(result["times"][name], base_times, strict=True))
        peaks = [p[name] for p in result["peaks"]]
        per_rank = " / ".join(f"{p / 2**20:.1f}" for p in peaks) + " MiB"
        ratio = max(peaks) / base_peak
        print(f"{name:<20} {ms:>11.1f} {pace:>6.2f}x {per_rank:>34} {ratio:>6.2f}x")
    print(f"(tp, chunked prefill: a reference, {result['piece_rows']} positions per forward through the KV cache)")
    spread = {name: [round(1e3 * t, 1) for t in ts] for name, ts in result["times"].items()}
    print(f"prefill ms per repetition: {spread}")


if __name__ == "__main__":
    main()
