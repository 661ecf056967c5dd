"""The grid of ranks: tensor-parallel (tp) inside a pipeline stage, pipeline-parallel (pp) across
stages, checked once against the model (like torchtitan's ParallelDims), and which blocks each stage
holds (Stages).

    global rank = stage * tp + tp_rank        tp innermost: a stage's tensor-parallel group is a run
                                              of consecutive ranks, so torchrun puts it on one node

A process hosts one or more of a stage's tensor-parallel ranks, of one or more stages (its Placement):

    dense        tp 1, pp 1                       ranks (0,),       stages (0,)
    simulated    tp N, pp P, every rank here      ranks (0..N-1),   stages (0..P-1)
    distributed  tp N, pp P, one rank here        ranks (r,),       stages (s,)
"""

import math
from dataclasses import dataclass

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError


@dataclass(frozen=True)
class ParallelDims:
    """A tp x pp grid of ranks."""

    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(stage, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a grid of {self.world_size}")
        return divmod(rank, self.tp)

    def rank(self, stage: int, tp_rank: int) -> int:
        if not (0 <= stage < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(f"(stage {stage}, tp rank {tp_rank}) outside a {self.tp} x {self.pp} grid")
        return stage * self.tp + tp_rank

    def tp_group(self, rank: int) -> list[int]:
        """The global ranks that split the same stage with `rank` (its tensor-parallel collectives)."""
        stage, _ = self.coordinates(rank)
        return [self.rank(stage, t) for t in range(self.tp)]

    def pp_group(self, rank: int) -> list[int]:
        """The global ranks that hold the same tensor-parallel slice in every stage (its pipeline)."""
        _, tp_rank = self.coordinates(rank)
        return [self.rank(s, tp_rank) for s in range(self.pp)]

    def check(self, config: GPTConfig) -> None:
        """Raise TpshardError unless this grid can split the model."""
        check_tp(config, self.tp)
        if self.pp < 1:
            raise TpshardError(f"--pp {self.pp}: must be at least 1")
        if self.pp > config.n_layer:
            raise TpshardError(f"--pp {self.pp}: more stages than the model's {config.n_layer} layers")


@dataclass(frozen=True)
class Stages:
    """How many consecutive blocks each pipeline stage holds, in order: (4, 4, 4) is blocks 0-3 on
    stage 0, 4-7 on stage 1, 8-11 on stage 2. Stage 0 also holds the embeddings (wte, wpe), the last
    stage ln_f and the output layer."""

    layers: tuple[int, ...]

    @classmethod
    def one(cls, n_layer: int) -> "Stages":
        return cls((n_layer,))

    @property
    def pp(self) -> int:
        return len(self.layers)

    @property
    def n_layer(self) -> int:
        return sum(self.layers)

    def blocks(self, stage: int) -> range:
        """The blocks of `stage`, by their index in the whole model."""
        first = sum(self.layers[:stage])
        return range(first, first + self.layers[stage])

    def stage_of(self, layer: int) -> int:
        return next(s for s in range(self.pp) if layer in self.blocks(s))

    def check(self, config: GPTConfig) -> None:
        """Raise TpshardError unless every stage holds at least one of the model's blocks."""
        if self.n_layer != config.n_layer:
            raise TpshardError(
                f"--stage-layers {self}: {self.n_layer} layers in all, the model has {config.n_layer}"
            )
        if min(self.layers) < 1:
            raise TpshardError(f"--stage-layers {self}: every stage needs at least one layer")

    def __str__(self) -> str:
        return ",".join(map(str, self.layers))

    @classmethod
    def parse(cls, text: str) -> "Stages":
        """'4,4,4' as typed after --stage-layers."""
        try:
            return cls(tuple(int(part) for part in text.split(",")))
        except ValueError:
            raise TpshardError(
                f"--stage-layers {text!r}: expected layers per stage separated by commas, e.g. 4,4,4"
            ) from None

    @classmethod
    def balanced(cls, n_layer: int, pp: int, block_bytes: int, first_bytes: int, last_bytes: int) -> "Stages":
        """The contiguous split whose largest stage holds the fewest bytes: every block weighs
        block_bytes, stage 0 also first_bytes (the embeddings), the last stage last_bytes (ln_f and
        its own copy of the output layer). Ties give the earlier stages the extra layers."""
        extra = [0] * pp
        extra[0] += first_bytes
        extra[-1] += last_bytes
        # The best bound M is the weight of some stage: try each candidate, smallest first, and keep
        # the first for which stages of at most M bytes (at least one layer each) can hold every layer.
        candidates = sorted({k * block_bytes + e for e in extra for k in range(1, n_layer - pp + 2)})
        for bound in candidates:
            room = [min(n_layer - pp + 1, (bound - e) // block_bytes) for e in extra]
            if min(room) >= 1 and sum(room) >= n_layer:
                return cls(_fill(room, n_layer))
        raise TpshardError(f"--pp {pp}: more stages than the model's {n_layer} layers")


def _fill(room: list[int], n_layer: int) -> tuple[int, ...]:
    """Layers per stage, at most room[s] each and one at least, n_layer in all: surplus room is
    given back from the stage that has the most layers, the last such stage first."""
    layers = list(room)
    while sum(layers) > n_layer:
        most = max(layers)
        layers[max(s for s, n in enumerate(layers) if n == most)] -= 1
    return tuple(layers)


@dataclass(frozen=True)
class Placement:
    """Which of a stage's tensor-parallel ranks this process holds, and of which stages."""

    tp_size: int = 1
    ranks: tuple[int, ...] = (0,)
    vocab_parallel: bool = False
    stages: Stages | None = None  # None: one stage, the whole model
    hosted: tuple[int, ...] = (0,)  # the stages this process holds (all of them, simulated)

    @classmethod
    def simulated(cls, tp_size: int, vocab_parallel: bool = False, stages: Stages | None = None) -> "Placement":
        hosted = tuple(range(stages.pp)) if stages else (0,)
        return cls(tp_size, tuple(range(tp_size)), vocab_parallel, stages, hosted)

    def stage_plan(self, n_layer: int) -> Stages:
        return self.stages or Stages.one(n_layer)

    @property
    def pipelined(self) -> bool:
        """More than one stage: the output layer is the last stage's own copy of the embedding."""
        return self.stages is not None and self.stages.pp > 1


DENSE = Placement()


def valid_tp_sizes(config: GPTConfig) -> list[int]:
    """Every N that gives each rank whole heads and an equal share of the MLP's 4*n_embd units: the
    divisors of their gcd, found in sqrt steps (a forged n_head can be 10**9)."""
    n = math.gcd(config.n_head, 4 * config.n_embd)
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def check_tp(config: GPTConfig, tp_size: int) -> None:
    """Megatron needs whole heads and an equal share of the MLP on every rank; say which one fails."""
    if tp_size < 1:
        raise TpshardError(f"--tp {tp_size}: must be at least 1; valid tp sizes for this model: {_listed(config)}")
    failing = [f"{name}={n}" for name, n in (("n_head", config.n_head), ("4*n_embd", 4 * config.n_embd)) if n % tp_size]
    if failing:
        raise TpshardError(
            f"--tp {tp_size} does not divide {' nor '.join(failing)}: every rank needs whole heads; "
            f"valid tp sizes for this model: {_listed(config)}"
        )


def _listed(config: GPTConfig) -> str:
    """valid_tp_sizes for an error message: computed only there, not on every model build."""
    return ", ".join(map(str, valid_tp_sizes(config)))
