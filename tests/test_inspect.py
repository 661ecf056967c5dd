"""`tpshard inspect` on a checkpoint, a shard directory and a lone rank file: the facts (checked against
what split really writes), their rendering, --json, and the refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG, ITER_NUM, NO_BIAS_CONFIG

from tpshard.describe import block_flow
from tpshard.files.digests import sha256_file


def inspect_json(cli, *args: object) -> tuple[int, dict]:
    code, out, err = cli("inspect", *args, "--json")
    assert err == "" or code != 0, err
    return code, json.loads(out)  # stdout is one JSON document and nothing else


@pytest.fixture(scope="module")
def shard_set(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bias_ckpt split 2 ways, with its meta.pkl. Read-only: copy it to damage it."""
    from tpshard.convert import split_checkpoint
    from tpshard.files.paths import load_checkpoint

    out = tmp_path_factory.mktemp("inspect") / "shards"
    split_checkpoint(load_checkpoint(bias_ckpt), 2, out, tokenizer_file=bias_ckpt.parent / "meta.pkl")
    return out


# --- a checkpoint -------------------------------------------------------------------------------------


def test_checkpoint_facts_match_the_file(bias_ckpt: Path, cli) -> None:
    code, facts = inspect_json(cli, bias_ckpt, "--tp", 2)
    assert code == 0
    raw = torch.load(bias_ckpt, weights_only=True)
    assert facts["kind"] == "checkpoint" and facts["format"] == "nanoGPT ckpt.pt"
    assert facts["model_args"] == raw["model_args"]
    stored = [t for name, t in raw["model"].items() if name != "lm_head.weight"]
    assert facts["parameters"] == sum(t.numel() for t in stored)
    assert facts["tensor_bytes"] == sum(t.numel() * 4 for t in stored)
    assert facts["dtype"] == "float32"
    assert facts["iter_num"] == ITER_NUM and facts["best_val_loss"] == pytest.approx(float(raw["best_val_loss"]))
    assert facts["tokenizer"].startswith("char (96 symbols)")
    moments = [t for state in raw["optimizer"]["state"].values() for t in state.values()]
    assert facts["optimizer"] == {
        "present": True,
        "tensors": len(moments),
        "bytes": sum(t.numel() * t.element_size() for t in moments),
    }
    assert [t["name"] for t in facts["plan"]["tensors"]] == list(raw["model"])  # every tensor, in order


def test_split_plan_is_what_split_writes(bias_ckpt: Path, tmp_path: Path, cli) -> None:
    """The plan's per-rank shapes and bytes are exactly those in the rank files split writes."""
    _, facts = inspect_json(cli, bias_ckpt, "--tp", 4)
    plan = facts["plan"]
    assert cli("split", bias_ckpt, "--tp", 4, "-o", tmp_path / "s")[0] == 0
    _, rank = inspect_json(cli, tmp_path / "s" / "rank3-of-4.safetensors")
    assert {t["name"]: t["shape"] for t in rank["tensors"]} == {
        t["name"]: t["rank_shape"] for t in plan["tensors"] if t["rule"] != "tied"
    }
    assert rank["tensor_bytes"] == plan["rank_bytes"]
    C, L = BIAS_CONFIG.n_embd, BIAS_CONFIG.n_layer
    assert plan["sync_points_per_forward"] == 2 * L
    assert plan["allreduce_payload_bytes"] == C * 4
    assert plan["allreduce_bytes_per_token"] == 2 * L * C * 4
    assert plan["valid_tp_sizes"] == [1, 2, 4]
    replicated = sum(t["rank_bytes"] for t in plan["tensors"] if t["rule"] == "replicated")
    assert plan["replicated_bytes"] == replicated > 0


def test_checkpoint_text_shows_every_tensor_and_its_split(bias_ckpt: Path, cli) -> None:
    code, out, _ = cli("inspect", bias_ckpt, "--tp", 2)
    assert code == 0
    for name in torch.load(bias_ckpt, weights_only=True)["model"]:
        assert name in out
    assert "column per head: q,k,v heads 0-1 | 2-3" in out  # 4 heads, 2 per rank
    assert "row: inputs 0-15 | 16-31" in out  # attn.c_proj: n_embd 32 split by input columns
    assert "column: outputs 0-63 | 64-127" in out  # mlp.c_fc: 4 x 32 hidden units
    assert "replicated, added after the all-reduce" in out  # the c_proj biases
    assert "tied to transformer.wte.weight" in out
    assert "4 per forward: 2 per layer" in out
    assert "512 B per generated token = 4 all-reduces x 128 B" in out
    assert "optimizer" in out and "sized, not read" in out
    assert "valid tp sizes: 1, 2, 4" in out


def test_without_tp_it_shows_tp_1_and_the_valid_sizes(nobias_ckpt: Path, cli) -> None:
    code, out, _ = cli("inspect", nobias_ckpt)
    assert code == 0
    assert "tp 1 (not split); valid tp sizes: 1, 2, 3, 6" in out
    assert "none at tp 1" in out
    _, facts = inspect_json(cli, nobias_ckpt)
    assert facts["plan"]["tp_size"] == 1 and facts["plan"]["sync_points_per_forward"] == 0
    assert facts["plan"]["rank_bytes"] == facts["plan"]["dense_bytes"] == facts["tensor_bytes"]


def test_many_ranks_are_elided_in_the_middle(nobias_ckpt: Path, cli) -> None:
    _, out, _ = cli("inspect", nobias_ckpt, "--tp", 6)
    assert "column per head: q,k,v heads 0 | 1 | … | 5" in out


@pytest.mark.parametrize(
    ("fixture", "tp", "phrases"),
    [
        ("bias_ckpt", 3, ["--tp 3", "n_head=4", "4*n_embd=128", "1, 2, 4"]),
        ("nobias_ckpt", 4, ["--tp 4", "n_head=6", "1, 2, 3, 6"]),
    ],
)
def test_tp_that_does_not_divide_is_one_line(fixture: str, tp: int, phrases, request, cli) -> None:
    code, out, err = cli("inspect", request.getfixturevalue(fixture), "--tp", tp)
    assert code == 2 and out == "" and err.count("\n") == 1
    for phrase in phrases:
        assert phrase in err


def test_no_tokenizer_is_said_plainly(make_checkpoint, cli) -> None:
    path = make_checkpoint(tokenizer=False)
    code, out, _ = cli("inspect", path)
    assert code == 0 and "none found" in out
    _, facts = inspect_json(cli, path)
    assert facts["tokenizer"] is None and "no tokenizer found" in facts["tokenizer_note"]


def test_a_dense_safetensors_and_checksums(shard_set: Path, bias_ckpt: Path, tmp_path: Path, cli) -> None:
    merged = tmp_path / "model.safetensors"
    assert cli("merge", shard_set, "-o", merged, "--format", "safetensors")[0] == 0
    _, facts = inspect_json(cli, merged)
    assert facts["format"] == "dense safetensors" and facts["optimizer"] == {"present": False, "tensors": 0, "bytes": 0}
    assert facts["sha256"] is None
    _, facts = inspect_json(cli, bias_ckpt, "--checksums")
    assert facts["sha256"] == sha256_file(bias_ckpt)  # what a manifest's source sha256 is compared with


# --- a shard directory --------------------------------------------------------------------------------


def test_shard_set_facts(shard_set: Path, bias_ckpt: Path, cli) -> None:
    code, facts = inspect_json(cli, shard_set, "--checksums")
    assert code == 0
    assert facts["kind"] == "shards" and facts["format_version"] == 1 and facts["tp_size"] == 2
    assert facts["source"]["sha256"] == sha256_file(bias_ckpt)
    assert facts["source"]["iter_num"] == ITER_NUM
    assert facts["tokenizer"] == "meta.pkl" and facts["tokenizer_present"]
    for rank in facts["ranks"]:
        path = shard_set / rank["file"]
        assert rank["bytes"] == path.stat().st_size
        assert rank["sha256"] == sha256_file(path)
        assert rank["share"] == pytest.approx(rank["tensor_bytes"] / facts["dense_bytes"])
        assert 0.5 < rank["share"] < 1  # half the split tensors, all the replicated ones
    assert facts["integrity"] == {
        "files_present": 2,
        "files_expected": 2,
        "sizes_match": True,
        "sha256_checked": True,
        "ok": True,
        "problems": [],
    }


def test_shard_set_text_draws_the_block(shard_set: Path, cli) -> None:
    code, out, _ = cli("inspect", shard_set)
    assert code == 0
    assert "format version 1" in out and "rank0-of-2.safetensors" in out and "rank1-of-2.safetensors" in out
    order = ["ln_1", "attn.c_attn", "attention", "attn.c_proj", "ALL-REDUCE #1", "+ attn.c_proj.bias", "+ residual"]
    order += ["ln_2", "mlp.c_fc", "gelu", "mlp.c_proj", "ALL-REDUCE #2", "+ mlp.c_proj.bias", "+ residual"]
    tree = out[out.index("one block") :]
    positions = []
    for op in order:
        positions.append(tree.index(op, positions[-1] + 1 if positions else 0))
    assert "integrity: ok" in out and "sha256 not checked" in out


def test_block_flow_without_biases_has_no_bias_step() -> None:
    ops = [step.op for branch in block_flow(NO_BIAS_CONFIG, 3, 4) for step in branch.steps]
    assert "ALL-REDUCE #1" in ops and not [op for op in ops if op.endswith(".bias")]


@pytest.fixture
def damaged(shard_set: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shard_set, copy)
    return copy


def test_a_flipped_bit_fails_only_with_checksums(damaged: Path, cli) -> None:
    rank1 = damaged / "rank1-of-2.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-5] ^= 0x10
    rank1.write_bytes(bytes(data))
    code, out, _ = cli("inspect", damaged)
    assert code == 0 and "integrity: ok" in out  # sizes and headers are fine: only sha256 can tell
    code, out, _ = cli("inspect", damaged, "--checksums")
    assert code == 1 and "integrity: FAILED" in out and "rank1-of-2.safetensors" in out and "sha256" in out
    code, facts = inspect_json(cli, damaged, "--checksums")
    assert code == 1 and not facts["integrity"]["ok"]
    assert [r["problem"] is None for r in facts["ranks"]] == [True, False]


def test_a_missing_rank_file_fails(damaged: Path, cli) -> None:
    (damaged / "rank0-of-2.safetensors").unlink()
    code, out, _ = cli("inspect", damaged)
    assert code == 1 and "1/2 files present" in out and "missing" in out


def test_tp_of_a_shard_set_cannot_change(shard_set: Path, cli) -> None:
    assert cli("inspect", shard_set, "--tp", 2)[0] == 0  # its own: fine
    code, _, err = cli("inspect", shard_set, "--tp", 4)
    assert code == 2 and "already split 2 ways" in err and "tpshard reshard" in err


def test_a_directory_that_is_no_shard_set(tmp_path: Path, cli) -> None:
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "no manifest.json" in err and err.count("\n") == 1


# --- a lone rank file ---------------------------------------------------------------------------------


def test_rank_file(shard_set: Path, cli) -> None:
    path = shard_set / "rank1-of-2.safetensors"
    code, facts = inspect_json(cli, path, "--checksums")
    assert code == 0
    assert (facts["kind"], facts["rank"], facts["tp_size"], facts["format_version"]) == ("rank_file", 1, 2, "1")
    assert facts["shard_set"] == str(shard_set) and facts["sha256_matches"] is True
    assert facts["tensors"][0]["name"] == "transformer.wte.weight"  # in file order, not sorted
    assert facts["file_bytes"] == path.stat().st_size > facts["tensor_bytes"]
    code, out, _ = cli("inspect", path)
    assert code == 0 and "rank 1 of 2" in out and "listed as rank 1" in out


def test_rank_file_alone(shard_set: Path, tmp_path: Path, cli) -> None:
    lone = tmp_path / "rank1-of-2.safetensors"
    shutil.copy(shard_set / "rank1-of-2.safetensors", lone)
    code, facts = inspect_json(cli, lone, "--checksums")
    assert code == 0 and facts["shard_set"] is None and facts["sha256_matches"] is None


def test_paths_are_printed_as_they_are(bias_ckpt: Path, tmp_path: Path, cli) -> None:
    """A path is data, never rich markup: "[/]" in a name must neither raise nor vanish."""
    odd = tmp_path / "we[/]ird[red]" / "ckpt.pt"
    odd.parent.mkdir(parents=True)  # "we[" holding "]ird[red]"
    shutil.copy(bias_ckpt, odd)
    code, out, _ = cli("inspect", odd)
    assert code == 0 and str(odd) in out
