"""The grid of ranks: tensor-parallel (tp) inside a pipeline stage, pipeline-parallel (pp) across
stages, checked once against the model (like torchtitan's ParallelDims).

    global rank = stage * tp + tp_rank        tp innermost: a stage's tensor-parallel group is a run
                                              of consecutive ranks, so torchrun puts it on one node

A process hosts one or more of a stage's tensor-parallel ranks (its Placement):

    dense        tp 1                     ranks (0,)
    simulated    tp N, every rank here    ranks (0..N-1)
    distributed  tp N, one rank here      ranks (r,)
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
class Placement:
    """Which of a stage's tensor-parallel ranks this process holds."""

    tp_size: int = 1
    ranks: tuple[int, ...] = (0,)
    vocab_parallel: bool = False

    @classmethod
    def simulated(cls, tp_size: int, vocab_parallel: bool = False) -> "Placement":
        return cls(tp_size, tuple(range(tp_size)), vocab_parallel)


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
