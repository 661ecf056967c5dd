"""The rank grid and the plan as data: ParallelDims' arithmetic and checks, the manifest's record of the
grid (and sets written before it was recorded), and the sync points that the model, inspect and
verify all take from the plan."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG

from tpshard.comm.collectives import LOCAL
from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import merge_shards, split_checkpoint
from tpshard.describe import block_flow, split_plan
from tpshard.errors import TpshardError
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.parallel import plan
from tpshard.parallel.grid import ParallelDims, Placement
from tpshard.parallel.layers import RowParallelLinear
from tpshard.runtime.models import sharded_model


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 3), (2, 2), (3, 4)])
def test_grid_coordinates_and_groups(tp: int, pp: int) -> None:
    grid = ParallelDims(tp, pp)
    ranks = range(grid.world_size)
    assert [grid.rank(*grid.coordinates(r)) for r in ranks] == list(ranks)
    assert {grid.coordinates(r) for r in ranks} == {(s, t) for s in range(pp) for t in range(tp)}
    for r in ranks:
        stage, tp_rank = grid.coordinates(r)
        tp_group, pp_group = grid.tp_group(r), grid.pp_group(r)
        assert tp_group == list(range(stage * tp, (stage + 1) * tp))  # consecutive: one node under torchrun
        assert pp_group == [s * tp + tp_rank for s in range(pp)]
        assert set(tp_group) & set(pp_group) == {r}
    with pytest.raises(ValueError):
        grid.coordinates(grid.world_size)
    with pytest.raises(ValueError):
        grid.rank(pp, 0)


def test_grid_checks_against_the_model() -> None:
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=10, block_size=8)
    ParallelDims(4, 2).check(config)
    with pytest.raises(TpshardError, match="--tp 3 does not divide n_head=4"):
        ParallelDims(3, 1).check(config)
    with pytest.raises(TpshardError, match="--pp 3: more stages than the model's 2 layers"):
        ParallelDims(1, 3).check(config)
    with pytest.raises(TpshardError, match="--pp 0"):
        ParallelDims(1, 0).check(config)


@pytest.fixture(scope="module")
def two_way(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grid") / "tp2"
    split_checkpoint(load_checkpoint(bias_ckpt), 2, out)
    return out


def edited(two_way: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "set"
    shutil.copytree(two_way, copy)
    data = json.loads((copy / MANIFEST).read_text())
    change(data)
    (copy / MANIFEST).write_text(json.dumps(data))
    return copy


def test_the_manifest_records_the_grid(two_way: Path) -> None:
    data = json.loads((two_way / MANIFEST).read_text())
    assert data["grid"] == {"tp": 2, "pp": 1} and data["tp_size"] == 2
    assert [(f["rank"], f["stage"], f["tp_rank"]) for f in data["files"]] == [(0, 0, 0), (1, 0, 1)]
    assert ShardSet.open(two_way).manifest.grid == ParallelDims(2, 1)


def test_a_set_written_before_the_grid_was_recorded_is_read(two_way: Path, bias_ckpt: Path, tmp_path: Path) -> None:
    def older(data: dict) -> None:
        del data["grid"]
        for entry in data["files"]:
            del entry["stage"], entry["tp_rank"]

    shards = ShardSet.open(edited(two_way, tmp_path, older))
    assert shards.manifest.grid == ParallelDims(2, 1)
    merged = merge_shards(shards)
    for name, tensor in load_checkpoint(bias_ckpt).state_dict.items():
        assert torch.equal(merged.state_dict[name], tensor), name


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda d: d["grid"].update(tp=4), "grid tp 4 but tp_size 2"),
        (lambda d: d["grid"].update(pp=2), "2 pipeline stages in a version 1 set"),
        (lambda d: d.update(grid=[2, 1]), "'grid' is not an object"),
        (lambda d: d["grid"].update(pp="1"), "grid"),
        (lambda d: d["files"][1].update(tp_rank=0), "files[1] at (stage, tp rank) (0, 0)"),
        (lambda d: d["files"][0].update(stage=1), "files[0] at (stage, tp rank) (1, 0)"),
    ],
)
def test_a_grid_that_disagrees_is_refused(two_way: Path, tmp_path: Path, change, phrase: str) -> None:
    with pytest.raises(TpshardError) as e:
        ShardSet.open(edited(two_way, tmp_path, change))
    assert phrase in str(e.value) and "\n" not in str(e.value)


def test_the_model_builds_its_layers_from_the_plan() -> None:
    model = GPT(BIAS_CONFIG, Placement.simulated(2))
    rows = [name for name, m in model.named_modules() if isinstance(m, RowParallelLinear)]
    expected = [f"transformer.h.{i}.{m}" for i in range(BIAS_CONFIG.n_layer) for m in plan.block_sync_points()]
    assert rows == expected and len(rows) == plan.sync_points(BIAS_CONFIG)


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_model_inspect_and_verify_count_the_same_sync_points(
    bias_ckpt: Path, tmp_path: Path, vocab_parallel: bool
) -> None:
    """One number from the plan: what a forward counts, what inspect shows, what verify's theory says."""
    split_checkpoint(load_checkpoint(bias_ckpt), 2, tmp_path / "s", vocab_parallel=vocab_parallel)
    counted = CountingCollectives(LOCAL)
    model = sharded_model(ShardSet.open(tmp_path / "s"), [0, 1], counted)
    with torch.no_grad():
        model(torch.randint(BIAS_CONFIG.vocab_size, (2, 5)))
    theory = plan.sync_points(BIAS_CONFIG, vocab_parallel)
    assert counted.calls == theory == 2 * BIAS_CONFIG.n_layer + vocab_parallel
    assert split_plan(BIAS_CONFIG, torch.float32, 2, vocab_parallel).sync_points_per_forward == theory
    reductions = [s for branch in block_flow(BIAS_CONFIG, 2, 4) for s in branch.steps if s.kind == "all-reduce"]
    assert len(reductions) == len(plan.block_sync_points())
