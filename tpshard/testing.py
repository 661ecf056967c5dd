"""Helpers for tests and benchmarks: models with random weights that make mistakes visible."""

import math

import torch

from tpshard.model import GPT


def random_weights(model: GPT, seed: int = 0) -> GPT:
    """Random weights for test and benchmark models: nanoGPT's init scale, and non-zero biases and
    LayerNorm gains so that a bias added twice or a mixed-up norm shows in the numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.02 / math.sqrt(2 * model.config.n_layer) if name.endswith("c_proj.weight") else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            if ".ln_" in name and name.endswith("weight"):
                p.add_(1.0)
    return model
