"""Dense decoding speed: tpshard's KV-cache decode against nanoGPT's loop (the whole sequence again for
every new token), and against what memory bandwidth allows, in one run.

    python benchmarks/bench_decode.py              GPT-2 124M shape, fp32, CPU, 16-token prompt, 128 tokens
    python benchmarks/bench_decode.py --reps 5     more repetitions of the cached decode (default 3)

Weights are random (speed does not depend on them); decoding is greedy, so both loops should produce
the same tokens (reported: with random weights two logits may be near-tied, and summation order can
flip one). On CPU a cached decode step is a chain of matrix-vector products: every
weight is read from memory once per token, so tokens/s cannot exceed

    memory bandwidth / weight bytes per token

Weight bytes per token: every parameter except wpe, of which a step reads one row (the tied wte is
read whole, as the output layer). The bandwidth is measured here with a large tensor copy (dst.copy_(src),
256 MB, far beyond the caches), counted as STREAM does: bytes read plus bytes written. The KV cache
adds 2 * n_layer * t * n_embd * 4 bytes at position t (2% of the weights at t = 144), not counted.

Targets: cached decode at least 4x nanoGPT's loop; at least 70% of the bandwidth bound. The machine
may be shared: the load average is printed; run it twice before believing a ratio.
"""

import argparse
import os
import statistics
import time

import torch

from tpshard.config import GPTConfig
from tpshard.generation import generate
from tpshard.model import GPT
from tpshard.testing import random_weights

PROMPT, NEW_TOKENS = 16, 128


def copy_bandwidth(megabytes: int = 256, reps: int = 10) -> float:
    """Bytes moved per second (read + written) by the best of `reps` large copies."""
    src = torch.rand(megabytes << 18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults out of the timing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


@torch.inference_mode()
def cached(model: GPT, prompt: torch.Tensor) -> tuple[list[int], float, float]:
    """tpshard's decode: (tokens, seconds to the first token (prefill), seconds for the rest)."""
    start = time.perf_counter()
    tokens, first = [], 0.0
    for token in generate(model, prompt, NEW_TOKENS, lambda logits: logits.argmax(-1)):
        tokens.append(int(token[0]))
        if len(tokens) == 1:
            first = time.perf_counter() - start
    return tokens, first, time.perf_counter() - start - first


@torch.inference_mode()
def recompute(model: GPT, prompt: torch.Tensor) -> tuple[list[int], float]:
    """nanoGPT's generate: the whole (cropped) sequence through the model for every token; like nanoGPT
    at inference, only the last position goes through lm_head."""
    idx, block_size = prompt, model.config.block_size
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits = model(idx[:, -block_size:], last_only=True)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, prompt.size(1) :].tolist(), time.perf_counter() - start


def weight_bytes_per_token(model: GPT) -> int:
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in unique) - wpe.numel() * wpe.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="cached decode repetitions, after a warm-up")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_weights(GPT(GPTConfig())).eval()
    prompt = torch.randint(model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    weights = weight_bytes_per_token(model)
    threads = torch.get_num_threads()
    print(f"GPT-2 124M shape, fp32, {threads} threads; prompt {PROMPT} tokens, {NEW_TOKENS} new tokens, greedy")

    bandwidth = copy_bandwidth()
    cached(model, prompt[:, :4])  # warm-up: allocator, kernels, page faults
    runs = [cached(model, prompt) for _ in range(args.reps)]
    tokens = runs[0][0]
    assert all(run[0] == tokens for run in runs)
    prefill = statistics.median(run[1] for run in runs)
    decode = statistics.median(run[2] for run in runs)
    recomputed, slow = recompute(model, prompt)
    agree = next((i for i, (a, b) in enumerate(zip(tokens, recomputed, strict=True)) if a != b), None)

    decode_tps = (NEW_TOKENS - 1) / decode
    overall_tps = NEW_TOKENS / (prefill + decode)
    nanogpt_tps = NEW_TOKENS / slow
    bound = bandwidth / weights
    rows = [
        ("KV-cache decode (tpshard)", f"{overall_tps:.1f}", f"{decode_tps:.1f}", f"{1e3 / decode_tps:.1f} ms"),
        ("full recompute (nanoGPT)", f"{nanogpt_tps:.1f}", "", f"{1e3 * slow / NEW_TOKENS:.1f} ms"),
        ("bandwidth bound", "", f"{bound:.1f}", f"{1e3 / bound:.1f} ms"),
    ]
    print(f"\n{'':<28}{'tokens/s (all 128)':>20}{'tokens/s (decode)':>20}{'per token':>12}")
    for name, overall, steady, per_token in rows:
        print(f"{name:<28}{overall:>20}{steady:>20}{per_token:>12}")
    print(
        f"\nweights read per token: {weights / 1e6:.1f} MB; copy bandwidth: {bandwidth / 1e9:.1f} GB/s "
        f"(read + written, best of 10 copies of 256 MB); prefill of {PROMPT} tokens: {1e3 * prefill:.0f} ms"
    )
    speedup, efficiency = overall_tps / nanogpt_tps, decode_tps / bound
    print(f"cached / recompute, all 128 tokens: {speedup:.1f}x (target >= 4x: {_met(speedup >= 4)})")
    print(f"decode / bandwidth bound:           {100 * efficiency:.0f}% (target >= 70%: {_met(efficiency >= 0.7)})")
    same = "the same greedy tokens" if agree is None else f"tokens differ from step {agree} (near-tied logits)"
    print(f"(both loops: {same}; load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
