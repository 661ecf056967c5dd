"""A Collectives that counts the reductions, the sequence-parallel reduce-scatters and all-gathers and
the stage-to-stage sends the model asks for, so that reports show measured, not theoretical,
communication (held against parallel.plan by verify)."""

import time

import torch

from tpshard.comm.collectives import Collectives

COUNTS = ("reductions", "reduced_bytes", "scatters", "gathers", "sequence_bytes", "sends", "sent_bytes")


class CountingCollectives(Collectives):
    def __init__(self, inner: Collectives):
        self.inner = inner
        self.calls = 0  # reductions
        self.bytes = 0  # bytes of the reduced activations (what an all-reduce carries per rank)
        self.sends = 0  # activations handed to the next pipeline stage
        self.sent_bytes = 0
        self.scatters = 0  # sequence-parallel reduce-scatters
        self.gathers = 0  # and all-gathers
        self.sequence_bytes = 0  # of the whole-sequence activations they span, [B, N*c, C] each
        self.at_sends: list[tuple[int, int, int]] = []  # (calls, scatters, gathers) as each send left: a stage's end
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

    def reduce_scatter_sequence(self, partials: torch.Tensor) -> torch.Tensor:
        self.scatters += 1
        self.sequence_bytes += partials[0].numel() * partials.element_size()
        return self.inner.reduce_scatter_sequence(partials)

    def all_gather_sequence(self, local: torch.Tensor) -> torch.Tensor:
        out = self.inner.all_gather_sequence(local)
        self.gathers += 1
        self.sequence_bytes += out.numel() * out.element_size()
        return out

    def snapshot(self) -> dict[str, int]:
        """Every count so far, by name (COUNTS)."""
        values = (self.calls, self.bytes, self.scatters, self.gathers, self.sequence_bytes, self.sends, self.sent_bytes)
        return dict(zip(COUNTS, values, strict=True))

    @property
    def collectives(self) -> tuple[int, int, int]:
        """(reductions, reduce-scatters, all-gathers) so far."""
        return self.calls, self.scatters, self.gathers

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        return self.inner.broadcast_token(token)

    def send_forward(self, x: torch.Tensor) -> None:
        self.inner.send_forward(x)
        self.at_sends.append(self.collectives)
        self.sends += 1
        self.sent_bytes += x.numel() * x.element_size()

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.recv_forward(shape, dtype, device)

    def reset(self) -> None:
        self.calls, self.bytes, self.sends, self.sent_bytes = 0, 0, 0, 0
        self.scatters, self.gathers, self.sequence_bytes = 0, 0, 0
        self.at_sends.clear()
        self.sync_seconds.clear()
