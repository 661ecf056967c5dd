"""Dense decoding speed against the read-bandwidth bound, the weight layout before and after
parallel/layers.py's decode_layout, and simulated tp 2 against dense, side by side in one run.

    python benchmarks/bench_decode.py                 GPT-2 124M shape, fp32, CPU, at 1 and 2 threads
    python benchmarks/bench_decode.py --reps 7        more alternating repetitions (default 5)
    python benchmarks/bench_decode.py --kernels       GB/s of each way to multiply by one weight, per
                                                      GPT-2 shape, batch 1 and 8, fp32 and bfloat16,
                                                      at the threads torch has (OMP_NUM_THREADS=1: one)
    python benchmarks/bench_decode.py --kernels --compile   the same, with torch.compile (inductor, freezing)

Weights are random (speed does not depend on them); decoding is greedy, 16-token prompt, 128 new
tokens. A cached decode step multiplies one token's activations by every weight once, so it reads
every weight once: tokens/s cannot exceed

    1 / (the time to read every weight once)

the read-bandwidth bound, measured here on the very tensors the model reads (each weight's sum(),
the best of 20 passes, with the same threads). Weight bytes per token: every parameter but wpe (one
row of it is read); the tied wte is read whole, as the output layer. The KV cache adds
2 * n_layer * t * n_embd * 4 bytes at position t (2% of the weights at t = 144), not counted.

Measured, alternating, each repetition in the order today / new / simulated (medians reported):
    today       nn.Linear's [out, in] weights, one F.linear per layer (the code before decode_layout)
    new         the decode layout (GPT.from_state_dict) and tpshard's linear (parallel/layers.py)
    simulated   tp 2, both ranks in this process, new layout (bmm over the ranks at each row layer)
and once: nanoGPT's loop (the whole sequence again for every token), for the cached / recompute ratio.

Targets: decode at least 60% of the bound (aim 70%); simulated tp 2 at most 1.1x dense decode time;
prefill (256 tokens) no slower than today's. The machine may be shared: the load average is printed;
compare the side-by-side ratios, not the absolute figures.
"""

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F

from tpshard.comm.collectives import LOCAL
from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.generation import generate
from tpshard.model import GPT
from tpshard.parallel import layers, plan
from tpshard.parallel.grid import Placement
from tpshard.testing import random_weights

PROMPT, NEW_TOKENS, PREFILL = 16, 128, 256
SHAPES = {  # GPT-2 124M's decode shapes, [out, in] as nn.Linear holds them
    "c_attn 2304x768": (2304, 768),
    "attn.c_proj 768x768": (768, 768),
    "c_fc 3072x768": (3072, 768),
    "mlp.c_proj 768x3072": (768, 3072),
    "lm_head 50257x768": (50257, 768),
}


@contextlib.contextmanager
def today() -> Iterator[None]:
    """The layers as they were before decode_layout: every linear a plain F.linear."""
    fast = layers.linear
    layers.linear = lambda x, weight, bias=None: F.linear(x, weight, bias)
    try:
        yield
    finally:
        layers.linear = fast


@torch.inference_mode()
def decode(model: GPT, prompt: torch.Tensor) -> tuple[list[int], float]:
    """Greedy tokens and the decode tokens/s (the steps after the first token)."""
    tokens, start = [], 0.0
    for token in generate(model, prompt, NEW_TOKENS, lambda logits: logits.argmax(-1)):
        tokens.append(int(token[0]))
        if len(tokens) == 1:
            start = time.perf_counter()
    return tokens, (NEW_TOKENS - 1) / (time.perf_counter() - start)


@torch.inference_mode()
def prefill_ms(model: GPT, idx: torch.Tensor) -> float:
    start = time.perf_counter()
    model(idx, last_only=True)
    return 1e3 * (time.perf_counter() - start)


@torch.inference_mode()
def recompute_tps(model: GPT, prompt: torch.Tensor) -> float:
    """nanoGPT's generate: the whole (cropped) sequence through the model for every token."""
    idx, block_size = prompt, model.config.block_size
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits = model(idx[:, -block_size:], last_only=True)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return NEW_TOKENS / (time.perf_counter() - start)


def weights_read_per_token(model: GPT) -> list[torch.Tensor]:
    wpe = model.transformer.wpe.weight
    return [p for p in {id(p): p for p in model.parameters()}.values() if p is not wpe]


@torch.inference_mode()
def read_seconds(tensors: list[torch.Tensor], passes: int = 20) -> float:
    """The best time to read every tensor once (sum())."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for t in tensors:
            t.sum()
        best = min(best, time.perf_counter() - start)
    return best


def simulated_tp2(dense: GPT) -> GPT:
    """Both ranks of a tp 2 split in this process, built as runtime.models builds them from files."""
    state = dense.state_dict()
    pieces = {name: [plan.shard(name, t, r, 2) for r in range(2)] for name, t in state.items()}
    local = plan.local_state_dict(pieces)
    return GPT.from_state_dict(dense.config, local, Placement.simulated(2), CountingCollectives(LOCAL))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def compare(threads: int, old: GPT, new: GPT, sim: GPT, reps: int) -> dict:
    torch.set_num_threads(threads)
    config = new.config
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(config.vocab_size, (1, PROMPT), generator=gen)
    long = torch.randint(config.vocab_size, (1, PREFILL), generator=gen)
    runs: dict[str, dict[str, list]] = {k: {"tps": [], "prefill": [], "tokens": []} for k in ("today", "new", "sim")}
    contexts: dict[str, Callable] = {"today": today, "new": contextlib.nullcontext, "sim": contextlib.nullcontext}
    models = {"today": old, "new": new, "sim": sim}
    reads = []
    for rep in range(reps + 1):  # rep 0 warms up (allocator, thread pool, page faults)
        reads.append(read_seconds(weights_read_per_token(new)))
        for name, model in models.items():
            with contexts[name]():
                tokens, tps = decode(model, prompt if rep else prompt[:, :4])
                ms = prefill_ms(model, long)
            if rep:
                runs[name]["tps"].append(tps)
                runs[name]["prefill"].append(ms)
                runs[name]["tokens"] = tokens
    weight_bytes = sum(t.numel() * t.element_size() for t in weights_read_per_token(new))
    read = min(reads)
    shares = [tps * seconds for tps, seconds in zip(runs["new"]["tps"], reads[1:], strict=True)]
    return {
        "threads": threads,
        "weight_bytes": weight_bytes,
        "read_gbs": weight_bytes / read / 1e9,
        "bound_tps": 1 / read,
        "share_per_rep": median(shares),  # each repetition's decode against its own best read
        **{f"{k}_tps": median(v["tps"]) for k, v in runs.items()},
        **{f"{k}_prefill_ms": median(v["prefill"]) for k, v in runs.items()},
        "same_tokens": runs["today"]["tokens"] == runs["new"]["tokens"] == runs["sim"]["tokens"],
        "reps": reps,
    }


def print_comparison(r: dict) -> None:
    bound, t = r["bound_tps"], r["threads"]
    print(
        f"\n{t} thread{'s' if t > 1 else ''}: read bandwidth {r['read_gbs']:.1f} GB/s over "
        f"{r['weight_bytes'] / 1e6:.1f} MB of weights per token -> bound {bound:.1f} tokens/s "
        f"({1e3 / bound:.1f} ms per token); median of {r['reps']}"
    )
    print(f"{'':34}{'decode tok/s':>13}{'ms/token':>10}{'of bound':>10}{'prefill 256':>13}")
    labels = {"today": "dense, today's layout (F.linear)", "new": "dense, decode layout", "sim": "simulated tp 2"}
    for key, label in labels.items():
        tps, pre = r[f"{key}_tps"], r[f"{key}_prefill_ms"]
        print(f"{label:34}{tps:13.1f}{1e3 / tps:10.1f}{100 * tps / bound:9.0f}%{pre:10.0f} ms")
    new, old, sim = r["new_tps"], r["today_tps"], r["sim_tps"]
    share, per_rep = new / bound, r["share_per_rep"]
    print(f"decode / bound:              {100 * share:.0f}% (target >= 60%: {_met(share >= 0.6)}; aim 70%); "
          f"{100 * per_rep:.0f}% against each repetition's own read (median)")  # fmt: skip
    print(f"decode layout / today:       {new / old:.2f}x tokens/s")
    ratio = new / sim
    print(f"simulated tp 2 / dense time: {ratio:.2f}x (target <= 1.1x: {_met(ratio <= 1.1)})")
    prefill = r["new_prefill_ms"] / r["today_prefill_ms"]
    print(f"prefill, new / today time:   {prefill:.2f}x (target: not slower)")
    print(f"greedy tokens: {'the same in all three' if r['same_tokens'] else 'differ (near-tied random logits?)'}")


# --- the kernels, one weight at a time ------------------------------------------------------------


def kernel_table(batch: int, dtype: torch.dtype, with_compile: bool, reps: int = 15) -> dict[str, dict[str, float]]:
    """GB/s (weight bytes / median time) of each option, per shape; options run round-robin."""
    table = {}
    for label, (out, inp) in SHAPES.items():
        nbytes = out * inp * dtype.itemsize
        n = max(2, int(160e6 // nbytes))  # a pool of weights far beyond the caches, cycled through
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(out, inp, generator=gen).to(dtype) for _ in range(n)]
        x = torch.randn(batch, inp, generator=gen).to(dtype)
        options = kernel_options(weights, x, with_compile)
        inner = max(1, int(40e6 // nbytes))
        times: dict[str, list[float]] = {k: [] for k in options}
        with torch.inference_mode():
            for f in options.values():
                f(0), f(1)
            for rep in range(reps):
                for name, f in options.items():
                    start = time.perf_counter()
                    for j in range(inner):
                        f((rep * inner + j) % n)
                    times[name].append((time.perf_counter() - start) / inner)
        table[label] = {k: nbytes / median(v) / 1e9 for k, v in times.items()}
    return table


def kernel_options(weights: list[torch.Tensor], x: torch.Tensor, with_compile: bool) -> dict[str, Callable]:
    """Each way to multiply x by weight i (i: which of the pool)."""
    out, inp = weights[0].shape
    transposed = [w.t().contiguous().t() for w in weights]  # [out, in] views of [in, out] copies
    stored = transposed if out > inp else weights  # decode_layout's choice
    threads = torch.get_num_threads()
    options: dict[str, Callable[[int], object]] = {
        "read: W.sum()": lambda i: weights[i].sum(),
        "F.linear, [out, in] (today)": lambda i: F.linear(x, weights[i]),
        "F.linear, [in, out] copy": lambda i: F.linear(x, transposed[i]),
    }
    if threads > 1:
        options["MKL split over threads, [in, out]"] = lambda i: layers._split_linear(x, transposed[i], threads)
    with contextlib.suppress(RuntimeError, AttributeError):  # a torch without oneDNN
        point = torch.ops.mkldnn._linear_pointwise
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, x.size(0)) for w in weights]
        options["oneDNN, [out, in]"] = lambda i: point(x, weights[i], None, "none", [], "")
        options["oneDNN, [in, out] copy"] = lambda i: point(x, transposed[i], None, "none", [], "")
        options["oneDNN prepacked (opaque copy)"] = lambda i: point(x, packed[i], None, "none", [], "")
    if with_compile and x.dtype == torch.float32:
        options["torch.compile, freezing"] = _compiled(weights, x)
    options["tpshard linear, decode layout"] = lambda i: layers.linear(x, stored[i])
    return options


def _compiled(weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[int], object]:
    """torch.compile with inductor's freezing (the weight a constant, prepacked by the compiler), one
    compiled module per weight of a pool of at least 40 MB (beyond the 32 MB L3)."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    inductor.freezing = True
    dynamo.cache_size_limit = dynamo.recompile_limit = 256  # a compilation per weight: no fallback to eager
    nbytes = weights[0].numel() * weights[0].element_size()
    compiled = []
    with torch.no_grad():
        for w in weights[: max(2, -(-(40 << 20) // nbytes))]:
            m = torch.nn.Linear(w.size(1), w.size(0), bias=False, dtype=w.dtype)
            m.weight.data = w
            compiled.append(torch.compile(m.eval(), dynamic=False))
            compiled[-1](x)

    def run(i: int) -> object:
        with torch.no_grad():
            return compiled[i % len(compiled)](x)

    return run


def print_kernels(with_compile: bool) -> None:
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 8):
            table = kernel_table(batch, dtype, with_compile)
            names = list(next(iter(table.values())))
            print(f"\nGB/s streamed, {str(dtype).removeprefix('torch.')}, batch {batch}, {threads} threads")
            print(f"{'':32}" + "".join(f"{s.split()[0]:>13}" for s in table))
            print(f"{'':32}" + "".join(f"{s.split()[1]:>13}" for s in table))
            for name in names:
                print(f"{name:32}" + "".join(f"{row[name]:13.1f}" for row in table.values()))


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions, after a warm-up")
    parser.add_argument("--threads", default="1,2", help="thread counts to compare (default 1,2)")
    parser.add_argument("--kernels", action="store_true", help="only the per-shape kernel table")
    parser.add_argument("--compile", action="store_true", help="with --kernels: torch.compile too (slow)")
    parser.add_argument("--no-recompute", action="store_true", help="skip nanoGPT's full-recompute loop")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {cpus} CPUs, load average {load}")
    if args.kernels:
        print_kernels(args.compile)
        return
    torch.manual_seed(0)
    old = random_weights(GPT(GPTConfig())).eval()  # built directly: nn.Linear's layout
    new = GPT.from_state_dict(old.config, dict(old.state_dict()))  # as every runtime builds it
    sim = simulated_tp2(old)
    moved = sum(p.data_ptr() != q.data_ptr() for p, q in zip(old.parameters(), new.parameters(), strict=True))
    print(f"GPT-2 124M shape, fp32; decode layout: {moved} weights stored [in, out]; prompt {PROMPT} tokens, "
          f"{NEW_TOKENS} new tokens, greedy; prefill {PREFILL} tokens")  # fmt: skip
    idx = torch.randint(old.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with today():
            want = old(idx)
        diffs = [(m(idx) - want).abs().max().item() for m in (new, sim)]
        step = [(new(idx[:1, :1]) - old(idx[:1, :1])).abs().max().item()]  # one row: the split kernel
    print(f"logits vs today's: max abs diff {diffs[0]:.1e} dense, {diffs[1]:.1e} simulated, {step[0]:.1e} one token")
    results = [compare(int(t), old, new, sim, args.reps) for t in args.threads.split(",") if int(t) <= cpus]
    for r in results:
        print_comparison(r)
    if not args.no_recompute:
        torch.set_num_threads(int(args.threads.split(",")[-1]))
        prompt = torch.randint(old.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
        slow = recompute_tps(new, prompt)
        threads = torch.get_num_threads()
        print(f"\nnanoGPT's loop (full recompute, decode layout, {threads} threads): {slow:.1f} tokens/s; "
              f"cached / recompute {results[-1]['new_tps'] / slow:.1f}x (decode tokens/s)")  # fmt: skip
    print(f"(load average now: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
