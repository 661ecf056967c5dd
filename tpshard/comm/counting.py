"""A Collectives that counts the reductions, the sequence-parallel reduce-scatters and all-gathers and
the stage-to-stage sends the model asks for, so that reports show measured, not theoretical,
communication (held against parallel.plan by verify)."""

import time

import torch

from tpshard.comm.collectives import Collectives, Piece

COUNTS = (
    "reductions",
    "reduced_bytes",
    "scatters",
    "gathers",
    "sequence_bytes",
    "received_bytes",
    "sends",
    "sent_bytes",
)


class CountingCollectives(Collectives):
    def __init__(self, inner: Collectives):
        self.inner = inner
        self.calls = 0  # reductions
        self.bytes = 0  # bytes of the reduced activations (what an all-reduce carries per rank)
        self.sends = 0  # activations handed to the next pipeline stage
        self.sent_bytes = 0
        self.scatters = 0  # sequence-parallel reduce-scatters
        self.gathers = 0  # and all-gathers
        self.pieces = 0  # the pieces they were carried in
        self.sequence_bytes = 0  # of the activations they span, [B, T, C] each, counted piece by piece
        self._received_before = 0  # the implementation's received_bytes at the last reset
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

    @property
    def piece_rows(self) -> int:  # type: ignore[override]
        return self.inner.piece_rows

    @property
    def received_bytes(self) -> int:  # type: ignore[override]
        """Counted by the implementation that moves them (what crossed from another process), since reset."""
        return self.inner.received_bytes - self._received_before

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        begin = time.perf_counter()
        out = self.inner.reduce_partials(partials)
        self.sync_seconds.append(time.perf_counter() - begin)
        self.calls += 1
        self.bytes += out.numel() * out.element_size()
        return out

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return self.inner.gather_logits(local)

    def gather_piece(self, rows: torch.Tensor | None, piece: Piece, like: torch.Tensor) -> torch.Tensor:
        out = self.inner.gather_piece(rows, piece, like)
        self.gathers += piece.first
        self.pieces += 1
        self.sequence_bytes += out.nbytes
        return out

    def reduce_piece(self, partials: torch.Tensor, piece: Piece, out: torch.Tensor | None) -> None:
        self.inner.reduce_piece(partials, piece, out)
        self.scatters += piece.first
        self.pieces += 1
        self.sequence_bytes += partials[0].nbytes

    def snapshot(self) -> dict[str, int]:
        """Every count so far, by name (COUNTS)."""
        sequence = (self.scatters, self.gathers, self.sequence_bytes, self.received_bytes)
        values = (self.calls, self.bytes, *sequence, self.sends, self.sent_bytes)
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
        self.scatters, self.gathers, self.pieces, self.sequence_bytes = 0, 0, 0, 0
        self._received_before = self.inner.received_bytes
        self.at_sends.clear()
        self.sync_seconds.clear()
