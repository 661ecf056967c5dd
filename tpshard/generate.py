"""Autoregressive generation with the KV cache, shared by the dense, simulated and distributed runtimes."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tpshard.model import GPT, KVCache


@dataclass
class Sampling:
    """nanoGPT sample.py's knobs."""

    temperature: float = 0.8
    top_k: int | None = 200
    greedy: bool = False
    seed: int = 1337


class TokenPicker:
    """Chooses the next token from the last position's logits (B, V): argmax, or nanoGPT's
    temperature + top-k sampling from a generator of its own (same seed, same tokens)."""

    def __init__(self, sampling: Sampling, device: torch.device | str = "cpu"):
        self.sampling = sampling
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.sampling.temperature
        if self.sampling.top_k is not None:
            v, _ = torch.topk(logits, min(self.sampling.top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


@torch.inference_mode()
def generate(
    model: GPT, idx: torch.Tensor, max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens tokens (B,) that continue idx (B, T): the prompt is prefilled once, then
    one token per step through the KV cache. Like nanoGPT, the context is cropped to block_size once
    the sequence outgrows it; positions then shift, which invalidates the cache, so each such step
    recomputes the cropped window, exactly as nanoGPT's generate does."""
    if max_new_tokens < 1:
        return
    block_size = model.config.block_size
    prompt = idx[:, -block_size:]
    # the cache holds the whole sequence unless it outgrows block_size (the last token is never fed)
    cache = KVCache(model, idx.size(0), capacity=prompt.size(1) + max_new_tokens - 1)
    logits = model(prompt, cache, last_only=True)
    for step in range(max_new_tokens):
        token = pick(logits[:, -1])
        yield token
        if step == max_new_tokens - 1:
            return  # the last token needs no forward of its own
        idx = torch.cat([idx, token[:, None]], dim=1)
        if cache.length < block_size:
            logits = model(idx[:, -1:], cache, last_only=True)
        else:
            cache.length = 0
            logits = model(idx[:, -block_size:], cache, last_only=True)
