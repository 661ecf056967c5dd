"""Pipeline stages in one process: the stage plan, split / merge / reshard between any two grids
(tp x pp), the manifest's stages, and the simulated tp x pp model against the dense model and
nanoGPT's own code. Processes (distributed, torchrun, failures) are in test_pipeline_distributed.py."""

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch

from tpshard.config import GPTConfig
from tpshard.convert import merge_shards, reshard, split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import Checkpoint, model_args
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.files.tensorfile import data_offsets
from tpshard.generation import Sampling, TokenPicker, generate
from tpshard.model import GPT
from tpshard.parallel import plan
from tpshard.parallel.grid import Stages
from tpshard.runtime.models import dense_model, simulated_model
from tpshard.runtime.programs import trace
from tpshard.testing import random_weights

# 3 layers: uneven on 2 stages; block 16 < prompt + new tokens, so generation crops its window
CONFIG = GPTConfig(block_size=16, vocab_size=53, n_layer=3, n_head=4, n_embd=32, bias=True)
GPT2 = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
GRIDS = [(1, 2), (2, 2), (4, 3), (2, 3), (1, 3)]  # (tp, pp)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    folder = tmp_path_factory.mktemp("pipeline")
    model = random_weights(GPT(CONFIG), seed=3)
    torch.save({"model": model.state_dict(), "model_args": model_args(CONFIG), "config": {}}, folder / "ckpt.pt")
    return load_checkpoint(folder / "ckpt.pt")


def split(ckpt: Checkpoint, out: Path, tp: int, pp: int, **options) -> ShardSet:
    split_checkpoint(ckpt, tp, out, pp=pp, **options)
    return ShardSet.open(out)


# --- the stage plan --------------------------------------------------------------------------------


def test_balanced_stages_minimise_the_largest_rank() -> None:
    # GPT-2 124M: wte (38.6M values) weighs about 5.4 blocks (7.1M each); replicated at tp 2, 11 blocks' worth
    assert plan.balanced_stages(GPT2, 2) == Stages((6, 6))
    assert plan.balanced_stages(GPT2, 3) == Stages((2, 8, 2))
    assert plan.balanced_stages(GPT2, 3, tp=2) == Stages((1, 10, 1))
    assert plan.balanced_stages(GPT2, 3, tp=2, vocab_parallel=True) == Stages((2, 8, 2))
    assert plan.balanced_stages(GPT2, 12) == Stages((1,) * 12)
    for pp in range(1, 13):  # brute force: no contiguous split has a lighter largest stage
        chosen = plan.balanced_stages(GPT2, pp)
        assert chosen.n_layer == 12 and min(chosen.layers) >= 1
        assert _heaviest(chosen) == min(_heaviest(Stages(c)) for c in _compositions(12, pp))


def _heaviest(stages: Stages) -> int:
    block, embeddings = 7_087_872, 50257 * 768  # one block's values; wte and its last-stage copy
    extra = [embeddings + 1024 * 768] + [0] * (stages.pp - 1)
    extra[-1] += (embeddings if stages.pp > 1 else 0) + 2 * 768
    return max(n * block + e for n, e in zip(stages.layers, extra, strict=True))


def _compositions(n: int, parts: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(n,)]
    return [(k, *rest) for k in range(1, n - parts + 2) for rest in _compositions(n - k, parts - 1)]


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--pp", "4"], "--pp 4: more stages than the model's 3 layers"),
        (["--pp", "2", "--stage-layers", "3,0"], "--stage-layers 3,0: every stage needs at least one layer"),
        (["--pp", "2", "--stage-layers", "1,1"], "--stage-layers 1,1: 2 layers in all, the model has 3"),
        (["--pp", "3", "--stage-layers", "1,2"], "--stage-layers 1,2: 2 stages given for --pp 3"),
        (["--pp", "2", "--stage-layers", "1;2"], "--stage-layers '1;2': expected layers per stage"),
        (["--pp", "0"], "--pp 0: must be at least 1"),
    ],
)
def test_a_bad_stage_plan_is_one_line(ckpt: Checkpoint, tmp_path: Path, cli, args: list[str], phrase: str) -> None:
    code, _, err = cli("split", ckpt.path, "--tp", "1", *args, "-o", tmp_path / "out")
    assert code == 2 and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --- split, merge, reshard --------------------------------------------------------------------------


def test_pp_1_writes_what_split_always_wrote(ckpt: Checkpoint, tmp_path: Path, cli) -> None:
    assert cli("split", ckpt.path, "--tp", "2", "-o", tmp_path / "plain")[0] == 0
    assert cli("split", ckpt.path, "--tp", "2", "--pp", "1", "-o", tmp_path / "pp1")[0] == 0
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "pp1").iterdir())
    for name in names:  # the manifest too: same bytes
        assert filecmp.cmp(tmp_path / "plain" / name, tmp_path / "pp1" / name, shallow=False), name
    manifest = json.loads((tmp_path / "pp1" / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and "stages" not in manifest


@pytest.mark.parametrize(("tp", "pp"), GRIDS)
def test_each_stage_holds_its_blocks_and_merge_is_bit_exact(ckpt: Checkpoint, tmp_path: Path, tp: int, pp: int) -> None:
    shards = split(ckpt, tmp_path / "s", tp, pp)
    m = shards.manifest
    stages = m.stage_plan
    assert stages == plan.balanced_stages(CONFIG, pp, tp) and stages.n_layer == CONFIG.n_layer
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert data["format_version"] == 2 and data["grid"] == {"tp": tp, "pp": pp}
    assert [s["layers"] for s in data["stages"]] == [[b.start, b.stop] for b in map(stages.blocks, range(pp))]
    assert data["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    for rank in range(tp * pp):
        stage, tp_rank = divmod(rank, tp)
        held = shards.load_rank(rank)
        blocks = {int(n.split(".")[2]) for n in held if n.startswith("transformer.h.")}
        assert blocks == set(stages.blocks(stage))
        assert ("transformer.wte.weight" in held) == (stage == 0) == ("transformer.wpe.weight" in held)
        assert ("lm_head.weight" in held) == (stage == pp - 1) == ("transformer.ln_f.weight" in held)
        if "lm_head.weight" in held:  # the last stage's own copy of the tied embedding
            want = plan.shard("lm_head.weight", ckpt.state_dict["transformer.wte.weight"], tp_rank, tp)
            assert torch.equal(held["lm_head.weight"], want)
        assert data["files"][rank]["stage"] == stage and data["files"][rank]["tp_rank"] == tp_rank
    merged = merge_shards(shards)
    assert merged.state_dict.keys() == ckpt.state_dict.keys()
    for name, tensor in ckpt.state_dict.items():
        assert torch.equal(merged.state_dict[name], tensor), name
    assert merged.state_dict["lm_head.weight"] is merged.state_dict["transformer.wte.weight"]  # written once


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ((2, 2, None), (1, 3, "1,1,1")),
        ((1, 3, None), (2, 1, None)),
        ((2, 1, None), (4, 2, "1,2")),
        ((4, 3, None), (2, 2, None)),
    ],
)
def test_reshard_between_grids_equals_a_direct_split(
    ckpt: Checkpoint, tmp_path: Path, start: tuple, target: tuple
) -> None:
    tp, pp, layers = start
    source = split(ckpt, tmp_path / "from", tp, pp, stage_layers=Stages.parse(layers) if layers else None)
    tp2, pp2, layers2 = target
    stages = Stages.parse(layers2) if layers2 else None
    reshard(source, tp2, tmp_path / "resharded", pp=pp2, stage_layers=stages)
    split(ckpt, tmp_path / "direct", tp2, pp2, stage_layers=stages)
    files = sorted(p.name for p in (tmp_path / "direct").glob("rank*"))
    assert len(files) == tp2 * pp2 and files == sorted(p.name for p in (tmp_path / "resharded").glob("rank*"))
    for name in files:
        assert filecmp.cmp(tmp_path / "direct" / name, tmp_path / "resharded" / name, shallow=False), name


def test_a_last_stage_copy_that_differs_from_wte_is_refused(ckpt: Checkpoint, tmp_path: Path) -> None:
    """The manifest says tied; a set whose two copies differ was modified (its checksums re-forged)."""
    from safetensors.torch import save_file

    from tpshard.files.digests import sha256_file

    shards = split(ckpt, tmp_path / "s", 1, 2)
    path = shards.rank_path(1)
    held = {name: t.clone() for name, t in shards.load_rank(1).items()}
    held["lm_head.weight"][0, 0] += 1
    metadata = {"format": "tpshard", "format_version": "2", "rank": "1", "tp_size": "1", "pp_size": "2"}
    save_file(held, path, metadata | {"stage": "1", "tp_rank": "0"})
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    data["files"][1] |= {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(TpshardError, match=r"lm_head\.weight differs from stage 0.s transformer\.wte\.weight"):
        merge_shards(ShardSet.open(tmp_path / "s"))


@pytest.mark.parametrize("against", [False, True])
def test_verify_checks_the_files_of_every_stage(ckpt: Checkpoint, tmp_path: Path, cli, against: bool) -> None:
    """A flipped byte in the last stage's tp rank 1 (its replicated ln_f, which the simulated run never
    reads: rank 0's copy serves): integrity fails there and names the tensor, with or without --against."""
    shards = split(ckpt, tmp_path / "s", 2, 2)
    path = shards.rank_path(3)
    data = bytearray(path.read_bytes())
    offset = next(o for name, o in data_offsets(path).items() if name == "transformer.ln_f.weight")
    data[offset + 3] ^= 0x40
    path.write_bytes(data)
    reference = ["--against", str(ckpt.path)] if against else []
    code, out, _ = cli("verify", tmp_path / "s", *reference, "--random-tokens", "8", "--tokens", "4", "--json")
    report = json.loads(out)
    assert code == 1 and not report["integrity"]["passed"]
    assert [f["status"] for f in report["integrity"]["files"]] == ["ok", "ok", "ok", "corrupt"]
    assert report["integrity"]["files"][3]["damaged_tensors"] == ["transformer.ln_f.weight"]


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda d: d.update(format_version=1), "2 pipeline stages in a version 1 set"),
        (lambda d: d.pop("stages"), "'stages' does not list 2 stages"),
        (lambda d: d["stages"][1].update(layers=[2, 3]), "stages[1] layers [2, 3] after layer 1"),
        (lambda d: d["stages"][0].update(layers=[0, 0]), "stages[0] layers [0, 0] after layer 0"),
        (lambda d: d["stages"][1].update(layers=[1, 2]), "the stages hold 2 layers, the model has 3"),
        (lambda d: d["stages"][1].update(ranks=[0, 1]), "stages[1] ranks [0, 1]"),
        (lambda d: d["tensors"].pop("lm_head.weight"), "tensor table disagrees"),
        (lambda d: d["files"].pop(), "3 files listed for a grid of 4 ranks"),
    ],
)
def test_a_damaged_stage_table_is_refused(ckpt: Checkpoint, tmp_path: Path, change, phrase: str) -> None:
    split(ckpt, tmp_path / "s", 2, 2)
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    change(data)
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(TpshardError) as e:
        ShardSet.open(tmp_path / "s")
    assert phrase in str(e.value) and "\n" not in str(e.value)


def test_rank_files_of_another_grid_are_refused(ckpt: Checkpoint, tmp_path: Path) -> None:
    """Same file names (4 ranks), another grid: each file says which grid it belongs to."""
    split(ckpt, tmp_path / "a", 2, 2)
    split(ckpt, tmp_path / "b", 4, 1)
    shutil.copy(tmp_path / "b" / "rank2-of-4.safetensors", tmp_path / "a" / "rank2-of-4.safetensors")
    data = json.loads((tmp_path / "a" / MANIFEST).read_text())
    data["files"][2] |= json.loads((tmp_path / "b" / MANIFEST).read_text())["files"][2] | {"stage": 1, "tp_rank": 0}
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(TpshardError, match="not a rank file of this tp 2 x pp 2 shard set"):
        ShardSet.open(tmp_path / "a").check_file(2)


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp"), GRIDS)
def test_simulated_pipeline_matches_dense_and_nanogpt(
    ckpt: Checkpoint, tmp_path: Path, nanogpt, tp: int, pp: int
) -> None:
    shards = split(ckpt, tmp_path / "s", tp, pp)
    sharded, dense = simulated_model(shards), dense_model(ckpt)
    reference = nanogpt(model_args(CONFIG)).eval()
    reference.load_state_dict(ckpt.state_dict, strict=False)
    idx = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size))  # fresh inputs each run, batch > 1
    with torch.inference_mode():
        got, hidden = trace(sharded, idx, 8, 0).logits, trace(sharded, idx, 8, 0).hidden
        want, want_hidden = trace(dense, idx, 8, 0).logits, trace(dense, idx, 8, 0).hidden
        theirs = reference(idx)
    # sums over ranks reassociate fp32 additions: measured ~1e-6 here on logits of magnitude ~1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, theirs, atol=1e-5, rtol=0)
    assert len(hidden) == len(want_hidden) == CONFIG.n_layer + 1
    for ours, dense_h in zip(hidden, want_hidden, strict=True):
        torch.testing.assert_close(ours, dense_h, atol=1e-5, rtol=0)
    counted = trace(sharded, idx, 8, 0)
    assert counted.stage_collectives == [
        (plan.stage_sync_points(CONFIG, shards.manifest.stage_plan, s), 0, 0) for s in range(pp)
    ]
    assert counted.forwards[0]["sends"] == pp - 1  # sends of one forward
    assert counted.forwards[0]["sent_bytes"] == (pp - 1) * idx.numel() * CONFIG.n_embd * 4


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_simulated_pipeline_generates_the_dense_tokens_past_block_size(
    ckpt: Checkpoint, tmp_path: Path, greedy: bool
) -> None:
    shards = split(ckpt, tmp_path / "s", 2, 3)
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 5))
    runs = []
    for model in (dense_model(ckpt), simulated_model(shards)):
        picker = TokenPicker(Sampling(greedy=greedy, seed=5, top_k=10))
        runs.append(torch.stack(list(generate(model, prompt, 3 * CONFIG.block_size, picker)), 1))
    assert torch.equal(runs[0], runs[1])


def test_inspect_shows_the_stage_plan(ckpt: Checkpoint, tmp_path: Path, cli) -> None:
    code, out, _ = cli("inspect", ckpt.path, "--tp", "2", "--pp", "2", "--json")
    assert code == 0
    stages = json.loads(out)["stages"]
    assert [s["blocks"] for s in stages] == [[0, 0], [1, 2]] and [s["ranks"] for s in stages] == [[0, 1], [2, 3]]
    assert [s["all_reduces"] for s in stages] == [2, 4]
    assert [s["send_bytes_per_token"] for s in stages] == [CONFIG.n_embd * 4, 0]
    split(ckpt, tmp_path / "s", 2, 2)
    code, out, _ = cli("inspect", tmp_path / "s", "--json")
    report = json.loads(out)
    assert code == 0 and report["stages"] == stages and report["pp_size"] == 2
    on_disk = [sum(1 for _ in ShardSet.open(tmp_path / "s").load_rank(r)) for r in range(4)]
    assert [r["tensors"] for r in report["ranks"]] == on_disk
    code, out, _ = cli("inspect", tmp_path / "s")
    assert "pipeline stages (2)" in out and "ln_f, lm_head" in out
    code, out, _ = cli("inspect", tmp_path / "s" / "rank3-of-4.safetensors", "--json")
    lone = json.loads(out)
    assert code == 0 and (lone["rank"], lone["tp_size"], lone["pp_size"], lone["stage"]) == (3, 2, 2, 1)
    code, _, err = cli("inspect", tmp_path / "s", "--pp", "3")
    assert code == 2 and "already split into 2 stage(s)" in err
