"""Autoregressive generation with the KV cache, the same for the dense, simulated and distributed
runtimes: nanoGPT's sampling, the token loop, and a Runner that times it and reads what the model's
collectives counted."""

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from tpshard.comm.counting import CountingCollectives
from tpshard.errors import TpshardError
from tpshard.model import GPT, KVCache

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (a negative seed would wrap around)


def check_seed(seed: int, option: str = "--seed") -> None:
    """A seed torch.Generator takes as it is: 0 .. 2**64 - 1."""
    if not 0 <= seed <= SEED_MAX:
        raise TpshardError(f"{option} {seed}: must be between 0 and 2**64 - 1 ({SEED_MAX})")


@dataclass
class Sampling:
    """nanoGPT sample.py's knobs."""

    temperature: float = 0.8
    top_k: int | None = 200
    greedy: bool = False
    seed: int = 1337

    def check(self) -> None:
        """Refuse knobs that cannot sample (the CLI's option names in the messages). The temperature
        is ignored when greedy, but must still be a number: nan and inf never mean anything."""
        if not math.isfinite(self.temperature):
            raise TpshardError(f"--temperature {self.temperature}: must be a finite number above 0")
        if self.temperature <= 0 and not self.greedy:
            raise TpshardError(
                f"--temperature {self.temperature}: must be above 0; for the most likely token use --greedy"
            )
        if self.top_k is not None and self.top_k < 1:
            raise TpshardError(f"--top-k {self.top_k}: must be 0 (all tokens) or more")
        check_seed(self.seed)


class TokenPicker:
    """Chooses the next token from the last position's logits (B, V): argmax, or nanoGPT's
    temperature + top-k sampling from a generator of its own (same seed, same tokens).

    A temperature so small that logits / temperature overflows float32 (1e-40, say: the largest
    scaled logit is then inf, or every one -inf) has no distribution to draw from; such a row takes
    the limit that temperatures approaching 0 tend to, the most likely token, as greedy does. Every
    other row is sampled exactly as nanoGPT samples it."""

    def __init__(self, sampling: Sampling, device: torch.device | str = "cpu"):
        sampling.check()
        self.sampling = sampling
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        scaled = logits / self.sampling.temperature
        overflow = ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))
        if overflow.any():  # the temperature is too small for float32: the most likely token
            most_likely = torch.full_like(scaled, -float("inf")).scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
            scaled = torch.where(overflow, most_likely, scaled)
        logits = scaled
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


@dataclass
class Stats:
    """What a run did, measured."""

    samples: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # prompt forward + first token, summed over samples
    decode_seconds: float = 0.0  # every later token
    forwards: int = 0
    sync_points: int = 0  # reductions done (counted by CountingCollectives); 0 for a dense model
    sync_bytes: int = 0  # bytes those reductions produced, per rank
    sync_median_seconds: float = 0.0  # one reduction's median wall time (decode steps and prefill alike)
    sequence_parallel: bool = False  # forwards of more than one token ran the sequence-parallel schedule
    sequence_forwards: int = 0  # of them: the forwards that ran it (the prompt's; windows recomputed past block_size)
    scatters: int = 0  # sequence-parallel reduce-scatters
    gathers: int = 0  # and all-gathers
    pieces: int = 0  # the pieces they were carried in
    sequence_bytes: int = 0  # of the activations they span, counted piece by piece
    received_bytes: int = 0  # of those pieces that crossed into this rank's process from another
    sends: int = 0  # activations handed to the next pipeline stage
    sent_bytes: int = 0
    comm_seconds: float = 0.0  # in cross-process collectives (waiting for the slowest rank included)
    p2p_seconds: float = 0.0  # of which between stages (sends, receives, the token broadcast)

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / seconds if seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - self.samples) / self.decode_seconds if self.decode_seconds else 0.0


class Runner:
    """Generation with one model, for any runtime: timed, its communication counted.

    Distributed, one rank alone picks each token (its picker holds the only RNG stream: tp rank 0 of
    the last stage) and broadcasts it, so every rank feeds the same token to its next step. The
    logits of a stage's ranks are bit-identical anyway (see comm/process_group.py), so each could
    draw from a generator of its own; the broadcast makes that a guarantee instead of a property of
    the kernels and the hardware, for one 8-byte collective per token.
    """

    def __init__(self, model: GPT, sampling: Sampling):
        self.model = model
        self.comm = model.comm
        self.device = model.device
        self.picker = TokenPicker(sampling, self.device) if self.comm.picks_tokens else None
        self._stats = Stats()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.picker is not None:
            if not torch.isfinite(logits).all():  # finite weights, overflowing activations: garbage, or a crash
                dtype = self.model.dtype
                hint = "; try --dtype float32" if dtype in (torch.float16, torch.bfloat16) else ""
                raise TpshardError(
                    f"the model's logits came out NaN or infinite (computing in {str(dtype).removeprefix('torch.')}): "
                    f"its activations overflow{hint}"
                )
            token = self.picker(logits)
        else:
            token = torch.empty(logits.size(0), dtype=torch.long, device=self.device)
        return self.comm.broadcast_token(token)

    def sample(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        """Yield max_new_tokens token ids continuing prompt (batch 1)."""
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        self._stats.samples += 1
        tokens = generate(self.model, idx, max_new_tokens, self._pick)
        hook = self.model.register_forward_pre_hook(self._count_sequence_parallel)
        try:
            start = time.perf_counter()
            for i, token in enumerate(tokens):
                value = int(token[0])  # waits for the device, so the time below is real
                elapsed = time.perf_counter() - start
                if i == 0:
                    self._stats.prefill_seconds += elapsed
                else:
                    self._stats.decode_seconds += elapsed
                self._stats.new_tokens += 1
                self._stats.forwards += 1  # each token took one: the prompt's, a step's, or a cropped window's
                yield value
                start = time.perf_counter()  # the consumer's time (printing) is not the model's
        finally:
            hook.remove()

    def _count_sequence_parallel(self, model: GPT, args: tuple) -> None:
        self._stats.sequence_forwards += model.sequence_split(args[0].size(1)) is not None

    def stats(self) -> Stats:
        counted = self.comm if isinstance(self.comm, CountingCollectives) else CountingCollectives(self.comm)
        return replace(
            self._stats,
            sync_points=counted.calls,
            sync_bytes=counted.bytes,
            sync_median_seconds=statistics.median(counted.sync_seconds) if counted.sync_seconds else 0.0,
            sequence_parallel=self.model.sequence_parallel,
            scatters=counted.scatters,
            gathers=counted.gathers,
            pieces=counted.pieces,
            sequence_bytes=counted.sequence_bytes,
            received_bytes=counted.received_bytes,
            sends=counted.sends,
            sent_bytes=counted.sent_bytes,
            comm_seconds=self.comm.seconds,
            p2p_seconds=self.comm.p2p_seconds,
        )
