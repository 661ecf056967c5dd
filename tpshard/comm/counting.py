"""A Collectives that counts the reductions the model asks for, so that reports show measured, not
theoretical, communication (held against parallel.plan.sync_points by verify)."""

import torch

from tpshard.comm.collectives import Collectives


class CountingCollectives(Collectives):
    def __init__(self, inner: Collectives):
        self.inner = inner
        self.calls = 0  # reductions
        self.bytes = 0  # bytes of the reduced activations (what an all-reduce carries per rank)

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self.inner.rank

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self.inner.world_size

    @property
    def seconds(self) -> float:  # type: ignore[override]
        return self.inner.seconds

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        out = self.inner.reduce_partials(partials)
        self.calls += 1
        self.bytes += out.numel() * out.element_size()
        return out

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return self.inner.gather_logits(local)

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        return self.inner.broadcast_token(token)

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0
