"""The thread rule (tpshard/runtime/threads.py): --threads, then OMP_NUM_THREADS, then one thread for a
small model and the idle CPUs shared among the run's processes for a bigger one; applied for a run
and undone after it, for this process and for the ranks it starts."""

import os
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG
from typer.testing import CliRunner

from tpshard.cli.app import app
from tpshard.config import GPTConfig
from tpshard.runtime import threads

GPT2 = GPTConfig()  # 124M parameters


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """machine(cpus, free): a machine of `cpus` CPUs, `free` of them idle; no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_up(cpus: int, free: int) -> None:
        monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
        monkeypatch.setattr(threads, "free_cpus", lambda: free)

    return set_up


def test_the_rule(machine) -> None:
    machine(8, 8)
    assert threads.parameters(BIAS_CONFIG) < threads.SMALL_MODEL < threads.parameters(GPT2, 2)
    assert threads.default_threads(threads.parameters(BIAS_CONFIG)) == 1  # small: one thread, whatever the machine
    assert threads.default_threads(threads.parameters(GPT2)) == 8
    assert threads.default_threads(threads.parameters(GPT2, 2), processes=2) == 4  # the CPUs shared by the ranks
    assert threads.default_threads(None, processes=3) == 2  # the model not known: a share of the CPUs
    machine(8, 3)  # 5 CPUs busy with other work
    assert threads.default_threads(threads.parameters(GPT2)) == 3
    assert threads.default_threads(threads.parameters(GPT2, 4), processes=4) == 1
    assert threads.default_threads(None, processes=2) == 4  # not known: the affinity's share, as torchrun gives


def test_explicit_then_omp_num_threads_then_the_rule(machine, monkeypatch: pytest.MonkeyPatch) -> None:
    machine(4, 4)
    big = threads.parameters(GPT2)
    assert threads.chosen_threads(big) == 4
    assert threads.chosen_threads(big, explicit=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.chosen_threads(big) == 2 and threads.chosen_threads(big, explicit=3) == 3
    for junk in ("", "0", "two", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert threads.chosen_threads(big) == 4


def test_a_run_sets_this_process_and_its_ranks_then_restores_both(machine) -> None:
    machine(4, 4)
    before = torch.get_num_threads()
    with threads.for_run(GPT2, ranks=2) as mine:
        assert mine == torch.get_num_threads() == 4  # dense or simulated: the whole model here
        assert os.environ["OMP_NUM_THREADS"] == "2"  # each of the 2 ranks started in the block
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
    with threads.for_run(BIAS_CONFIG, ranks=2, explicit=3):
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ


def test_free_cpus_reads_the_machine() -> None:
    assert 1 <= threads.free_cpus() <= threads.available_cpus()


def test_generate_takes_threads_and_gives_them_back(bias_ckpt: Path) -> None:
    before = torch.get_num_threads()
    args = ["generate", str(bias_ckpt), "--threads", "1", "--max-new-tokens", "3", "--greedy", "--prompt", "ab"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == before
    assert CliRunner().invoke(app, [*args[:2], "--threads", "0"]).exit_code != 0  # at least 1
