"""A Collectives that counts the reductions and the stage-to-stage sends the model asks for, so that
reports show measured, not theoretical, communication (held against parallel.plan by verify)."""

import time

import torch

from tpshard.comm.collectives import Collectives


class CountingCollectives(Collectives):
    def __init__(self, inner: Collectives):
        self.inner = inner
        self.calls = 0  # reductions
        self.bytes = 0  # bytes of the reduced activations (what an all-reduce carries per rank)
        self.sends = 0  # activations handed to the next pipeline stage
        self.sent_bytes = 0
        self.calls_at_sends: list[int] = []  # reductions counted when each send left: where a stage's end
        self.sync_seconds: list[float] = []  # each reduction's wall time, the wait for the other ranks included

    @property
    def picks_tokens(self) -> bool:  # type: ignore[override]
        return self.inner.picks_tokens

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self.inner.rank

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self.inner.world_size

    @property
    def seconds(self) -> float:  # type: ignore[override]
        return self.inner.seconds

    @property
    def p2p_seconds(self) -> float:  # type: ignore[override]
        return self.inner.p2p_seconds

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        begin = time.perf_counter()
        out = self.inner.reduce_partials(partials)
        self.sync_seconds.append(time.perf_counter() - begin)
        self.calls += 1
        self.bytes += out.numel() * out.element_size()
        return out

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return self.inner.gather_logits(local)

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        return self.inner.broadcast_token(token)

    def send_forward(self, x: torch.Tensor) -> None:
        self.inner.send_forward(x)
        self.calls_at_sends.append(self.calls)
        self.sends += 1
        self.sent_bytes += x.numel() * x.element_size()

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.recv_forward(shape, dtype, device)

    def reset(self) -> None:
        self.calls, self.bytes, self.sends, self.sent_bytes = 0, 0, 0, 0
        self.calls_at_sends.clear()
        self.sync_seconds.clear()
