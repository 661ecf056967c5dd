"""Split, merge and reshard on disk: bit-exact round trips, the Megatron layout of every rank's pieces,
the c_proj bias added once, and every refusal (one line, exit 2, nothing half-written)."""

import errno
import gc
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG, NO_BIAS_CONFIG

from tpshard import convert
from tpshard.comm.collectives import LOCAL
from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import merge_shards, merge_to, merged_checkpoint, reshard, split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files import shardset, tensorfile
from tpshard.files.checkpoint import Checkpoint, model_args
from tpshard.files.hf import hf_state_dict
from tpshard.files.nanogpt import nanogpt_dict, save_checkpoint
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.parallel import layers
from tpshard.parallel.plan import dense_shapes
from tpshard.runtime.models import sharded_model
from tpshard.testing import random_weights

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


@pytest.fixture(scope="module")
def models(bias_ckpt: Path, nobias_ckpt: Path) -> dict[str, Path]:
    """The shipped samples (4 heads with biases; 6 heads without), or fixtures of the same layouts
    while the samples are being trained."""
    char, bpe = SAMPLES / "shakespeare_char" / "ckpt.pt", SAMPLES / "shakespeare_bpe" / "ckpt.pt"
    return {"bias": char if char.is_file() else bias_ckpt, "no-bias": bpe if bpe.is_file() else nobias_ckpt}


def nanogpt_load(path: Path) -> dict:
    """What nanoGPT's sample.py does with a ckpt.pt: torch.load it, read 'model' and 'model_args'."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoint(source: Path, merged: Path, nanogpt, dtype: torch.dtype | None = None) -> None:
    src, out = nanogpt_load(source), nanogpt_load(merged)
    expected = {k.removeprefix("_orig_mod."): v for k, v in src["model"].items()}
    expected = {k: v for k, v in expected.items() if not (k.endswith(".attn.bias") and "c_attn" not in k)}
    assert list(out["model"]) == list(expected)  # nanoGPT's names, in nanoGPT's order
    for name, tensor in expected.items():
        want = tensor if dtype is None else tensor.to(dtype)
        assert out["model"][name].dtype == want.dtype, name
        assert torch.equal(out["model"][name], want), name
    assert out["model"]["lm_head.weight"].data_ptr() == out["model"]["transformer.wte.weight"].data_ptr()
    assert out["model_args"] == src["model_args"]
    assert out["iter_num"] == src["iter_num"]
    assert torch.equal(out["best_val_loss"], src["best_val_loss"])
    assert out["config"] == src["config"]
    nanogpt(out["model_args"]).load_state_dict(out["model"])  # GPT(GPTConfig(**model_args)), strict


ROUND_TRIPS = [("bias", 1), ("bias", 2), ("bias", 4), ("no-bias", 2), ("no-bias", 3), ("no-bias", 6)]


@pytest.mark.parametrize(("model", "tp"), ROUND_TRIPS, ids=[f"{m}-tp{tp}" for m, tp in ROUND_TRIPS])
def test_split_then_merge_is_bit_exact(models: dict, model: str, tp: int, tmp_path: Path, cli, nanogpt) -> None:
    code, _, err = cli("split", models[model], "--tp", tp, "-o", tmp_path / "shards")
    assert code == 0, err
    code, _, err = cli("merge", tmp_path / "shards", "-o", tmp_path / "merged.pt")
    assert code == 0, err
    assert_same_checkpoint(models[model], tmp_path / "merged.pt", nanogpt)


@pytest.mark.parametrize("fixture", ["compiled_ckpt", "mask_ckpt"])
def test_training_leftovers_merge_to_plain_nanogpt(fixture: str, request, tmp_path: Path, cli, nanogpt) -> None:
    """A torch.compile prefix or mask buffers in the source: the merged file has nanoGPT's plain names."""
    source = request.getfixturevalue(fixture)
    assert cli("split", source, "--tp", 2, "-o", tmp_path / "shards")[0] == 0
    assert cli("merge", tmp_path / "shards", "-o", tmp_path / "merged.pt")[0] == 0
    assert_same_checkpoint(source, tmp_path / "merged.pt", nanogpt)


def test_bfloat16_split_merges_to_the_source_in_bfloat16(models: dict, tmp_path: Path, cli, nanogpt) -> None:
    assert cli("split", models["bias"], "--tp", 2, "--dtype", "bfloat16", "-o", tmp_path / "shards")[0] == 0
    assert ShardSet.open(tmp_path / "shards").manifest.dtype == torch.bfloat16
    assert cli("merge", tmp_path / "shards", "-o", tmp_path / "merged.pt")[0] == 0
    assert_same_checkpoint(models["bias"], tmp_path / "merged.pt", nanogpt, dtype=torch.bfloat16)


@pytest.mark.slow
def test_gpt2_124m_round_trip(tmp_path: Path, nanogpt) -> None:
    """GPT-2 small's shapes (12 x 12 heads x 768, vocab 50304): about 500 MB of fp32, split 2 ways."""
    config = GPTConfig()
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in dense_shapes(config).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    source = tmp_path / "ckpt.pt"
    ckpt = {"model": state, "model_args": model_args(config), "iter_num": 600_000}
    torch.save({**ckpt, "best_val_loss": torch.tensor(2.85), "config": {"dataset": "openwebtext"}}, source)
    del state, ckpt
    split_checkpoint(load_checkpoint(source), 2, tmp_path / "shards")
    save_checkpoint(merge_shards(ShardSet.open(tmp_path / "shards")), tmp_path / "merged.pt")
    assert_same_checkpoint(source, tmp_path / "merged.pt", nanogpt)


# --- reshard ------------------------------------------------------------------------------------------


def rank_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("rank*.safetensors"))}


def test_reshard_equals_a_direct_split_byte_for_byte(nobias_ckpt: Path, tmp_path: Path, cli) -> None:
    for tp in (2, 3, 6):
        assert cli("split", nobias_ckpt, "--tp", tp, "-o", tmp_path / f"split{tp}")[0] == 0
    for old, new in ((2, 6), (6, 2), (3, 2)):
        assert cli("reshard", tmp_path / f"split{old}", "--tp", new, "-o", tmp_path / f"re{old}to{new}")[0] == 0
        assert rank_files(tmp_path / f"re{old}to{new}") == rank_files(tmp_path / f"split{new}")
        resharded = ShardSet.open(tmp_path / f"re{old}to{new}").manifest
        assert resharded.files == ShardSet.open(tmp_path / f"split{new}").manifest.files
        assert resharded.source["resharded_from_tp"] == old


def test_reshard_2_to_4_and_back(bias_ckpt: Path, tmp_path: Path, cli) -> None:
    for tp in (2, 4):
        assert cli("split", bias_ckpt, "--tp", tp, "-o", tmp_path / f"split{tp}")[0] == 0
    assert cli("reshard", tmp_path / "split2", "--tp", 4, "-o", tmp_path / "four")[0] == 0
    assert cli("reshard", tmp_path / "split4", "--tp", 2, "-o", tmp_path / "two")[0] == 0
    assert rank_files(tmp_path / "four") == rank_files(tmp_path / "split4")
    assert rank_files(tmp_path / "two") == rank_files(tmp_path / "split2")


# --- the layout of each rank's pieces ----------------------------------------------------------------


def expected_piece(name: str, dense: torch.Tensor, rank: int, tp: int, config: GPTConfig) -> torch.Tensor:
    """Megatron's layout, written out independently of plan.py."""
    C = config.n_embd
    if ".attn.c_attn." in name:  # rows: q of this rank's heads, then k of them, then v
        width = C // tp  # heads per rank x head size
        return torch.cat([dense[part * C + rank * width : part * C + (rank + 1) * width] for part in range(3)])
    if ".mlp.c_fc." in name:  # output rows
        return dense[rank * 4 * C // tp : (rank + 1) * 4 * C // tp]
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):  # input columns
        return dense[:, rank * dense.size(1) // tp : (rank + 1) * dense.size(1) // tp]
    return dense  # LayerNorms, wte, wpe, the c_proj biases


@pytest.mark.parametrize(
    ("fixture", "config", "tp"), [("bias_ckpt", BIAS_CONFIG, 2), ("nobias_ckpt", NO_BIAS_CONFIG, 3)]
)
def test_each_rank_holds_its_heads_q_k_v(fixture: str, config: GPTConfig, tp: int, request, tmp_path: Path) -> None:
    ckpt = load_checkpoint(request.getfixturevalue(fixture))
    split_checkpoint(ckpt, tp, tmp_path / "shards")
    shard_set = ShardSet.open(tmp_path / "shards")
    for rank in range(tp):
        pieces = shard_set.load_rank(rank)
        for name, piece in pieces.items():
            assert torch.equal(piece, expected_piece(name, ckpt.state_dict[name], rank, tp, config)), (rank, name)
        qkv = pieces["transformer.h.0.attn.c_attn.weight"]
        assert not torch.equal(qkv, ckpt.state_dict["transformer.h.0.attn.c_attn.weight"].chunk(tp)[rank])


def bias_per_rank(linear: layers.RowParallelLinear, x: torch.Tensor, comm, seq=None) -> torch.Tensor:
    """The classic mistake: every rank adds the c_proj bias to its own partial sum, before the reduction
    (tensor-parallel: seq, the sequence-parallel layout, is None here)."""
    assert seq is None
    R, k = x.shape[2:]
    partials = torch.einsum("btrk,crk->rbtc", x, linear.weight.view(-1, R, k))
    if linear.bias is not None:
        partials = partials + linear.bias
    return comm.reduce_partials(partials)


@torch.inference_mode()
def test_c_proj_bias_is_added_once_after_the_reduction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = random_weights(GPT(BIAS_CONFIG), seed=7).eval()
    for name, p in dense.named_parameters():
        if name.endswith("c_proj.bias"):
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))  # large, non-zero
    (tmp_path / "ckpt.pt").touch()  # split hashes its source file
    split_checkpoint(Checkpoint(tmp_path / "ckpt.pt", BIAS_CONFIG, dense.state_dict()), 4, tmp_path / "tp4")
    simulated = CountingCollectives(LOCAL)  # 4 ranks in this process
    sharded = sharded_model(ShardSet.open(tmp_path / "tp4"), [0, 1, 2, 3], simulated)
    idx = torch.randint(BIAS_CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    want = dense(idx)
    torch.testing.assert_close(sharded(idx), want, atol=1e-5, rtol=0)  # measured ~1e-6: sums reassociated

    # one row-parallel layer by hand: a bias per rank adds it N times, (N - 1) too many
    c_proj = sharded.transformer.h["0"].attn.c_proj
    x = torch.randn(2, 5, 4, BIAS_CONFIG.n_embd // 4, generator=torch.Generator().manual_seed(1))
    assert isinstance(c_proj, layers.RowParallelLinear)  # as the plan says
    once = c_proj(x, LOCAL)
    torch.testing.assert_close(bias_per_rank(c_proj, x, LOCAL) - once, 3 * c_proj.bias.expand_as(once))

    # the whole model with that mistake: its logits leave the dense model's (measured ~1e-2 off)
    monkeypatch.setattr(layers.RowParallelLinear, "forward", bias_per_rank)
    assert (sharded(idx) - want).abs().max() > 1e-3
    torch.testing.assert_close(dense(idx), want, atol=1e-5, rtol=0)  # one rank: the variant is the dense model


# --- refusals -----------------------------------------------------------------------------------------


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, err
    assert out == ""
    assert err.startswith("tpshard: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("fixture", "tp", "phrases"),
    [
        ("bias_ckpt", 3, ["--tp 3", "n_head=4", "4*n_embd=128", "valid tp sizes for this model: 1, 2, 4"]),
        ("nobias_ckpt", 4, ["--tp 4", "n_head=6", "valid tp sizes for this model: 1, 2, 3, 6"]),
        ("nobias_ckpt", 0, ["--tp 0", "at least 1", "1, 2, 3, 6"]),
    ],
)
def test_tp_that_does_not_divide_is_refused(fixture: str, tp: int, phrases, request, tmp_path: Path, cli) -> None:
    err = one_line_error(*cli("split", request.getfixturevalue(fixture), "--tp", tp, "-o", tmp_path / "out"))
    for phrase in phrases:
        assert phrase in err
    if tp == 4:
        assert "4*n_embd" not in err  # 4 divides 4*48: only the heads are named
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_force_replaces(bias_ckpt: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = one_line_error(*cli("split", bias_ckpt, "--tp", 2, "-o", out))
    assert str(out) in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli("split", bias_ckpt, "--tp", 2, "-o", out, "--force")[0] == 0
    assert not (out / "keep.txt").exists()
    assert ShardSet.open(out).tp_size == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def fail_on_rank_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's file fails half-way through (the disk fills up)."""
    real = shardset.write_safetensors_files

    def write(files: list, produce, progress=None) -> list:
        for path, _, metadata in files:
            if metadata["rank"] == "1":
                path.write_bytes(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(files, produce, progress)

    monkeypatch.setattr(shardset, "write_safetensors_files", write)


def test_failed_split_leaves_nothing_behind(bias_ckpt: Path, tmp_path: Path, cli, monkeypatch) -> None:
    fail_on_rank_1(monkeypatch)
    before = sorted(tmp_path.iterdir())
    err = one_line_error(*cli("split", bias_ckpt, "--tp", 2, "-o", tmp_path / "out"))
    assert "No space left on device" in err
    assert sorted(tmp_path.iterdir()) == before  # no OUT, no temporary directory


def test_failed_forced_split_keeps_the_old_output(bias_ckpt: Path, tmp_path: Path, cli, monkeypatch) -> None:
    assert cli("split", bias_ckpt, "--tp", 4, "-o", tmp_path / "out")[0] == 0
    old = rank_files(tmp_path / "out")
    fail_on_rank_1(monkeypatch)
    one_line_error(*cli("split", bias_ckpt, "--tp", 2, "-o", tmp_path / "out", "--force"))
    assert rank_files(tmp_path / "out") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture
def shard_dir(bias_ckpt: Path, tmp_path: Path, cli) -> Path:
    assert cli("split", bias_ckpt, "--tp", 2, "-o", tmp_path / "shards")[0] == 0
    return tmp_path / "shards"


def test_merge_refuses_a_corrupted_rank_file(shard_dir: Path, cli) -> None:
    rank1 = shard_dir / "rank1-of-2.safetensors"
    data = bytearray(rank1.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    rank1.write_bytes(bytes(data))
    err = one_line_error(*cli("merge", shard_dir, "-o", shard_dir.parent / "merged.pt"))
    assert str(rank1) in err and "sha256" in err
    assert not (shard_dir.parent / "merged.pt").exists()


@pytest.mark.parametrize("corrupt", ["rank0-of-2.safetensors", "rank1-of-2.safetensors"])
def test_a_corrupted_rank_file_leaves_no_output(corrupt: str, shard_dir: Path, cli) -> None:
    """The rank files' sha256 are checked while the output is written from them: every merge format
    and reshard, found out whichever file is damaged, say so in one line and leave nothing behind, not
    even a temporary."""
    path = shard_dir / corrupt
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of the last weight: read last
    path.write_bytes(bytes(data))
    work = shard_dir.parent
    before = sorted(p.name for p in work.iterdir())
    outputs = [("merge", "m.pt", "pt"), ("merge", "m.safetensors", "safetensors"), ("merge", "hf", "hf")]
    outputs += [("merge", "dcp", "dcp")]
    for command, name, fmt in outputs:
        err = one_line_error(*cli(command, shard_dir, "-o", work / name, "--format", fmt))
        assert str(path) in err and "sha256 differs" in err, (fmt, err)
    err = one_line_error(*cli("reshard", shard_dir, "--tp", 4, "-o", work / "tp4"))
    assert str(path) in err and "sha256 differs" in err
    assert sorted(p.name for p in work.iterdir()) == before


def test_the_library_merges_hand_out_tensors_of_their_own(bias_ckpt: Path, shard_dir: Path) -> None:
    """merged_checkpoint's tensors, and nanogpt_dict's and hf_state_dict's of it, all kept at once, are
    the source's: the memory that tpshard's own writers reuse (convert.merge_to) is never handed out."""
    source = load_checkpoint(bias_ckpt)
    shards = ShardSet.open(shard_dir)
    kept = dict(merged_checkpoint(shards).state_dict.items())
    assert kept.keys() == source.state_dict.keys()
    assert all(torch.equal(kept[name], tensor) for name, tensor in source.state_dict.items())
    model = nanogpt_dict(merged_checkpoint(shards))["model"]
    assert all(torch.equal(model[name], tensor) for name, tensor in source.state_dict.items())
    hf, expected = hf_state_dict(merged_checkpoint(shards)), hf_state_dict(source)
    assert hf.keys() == expected.keys() and all(torch.equal(hf[key], expected[key]) for key in expected)


@pytest.mark.parametrize("merge", [merged_checkpoint, merge_shards])
def test_the_library_merges_check_the_sha256_at_once(merge, shard_dir: Path) -> None:
    """A corrupted rank file fails the merge itself, before a tensor is handed out."""
    path = shard_dir / "rank1-of-2.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TpshardError, match="sha256 differs") as failed:
        merge(ShardSet.open(shard_dir))
    assert str(path) in str(failed.value)


@pytest.mark.parametrize("output", ["pt", "safetensors", "hf", "dcp", "reshard"])
def test_a_rank_file_changed_while_the_output_is_written_is_refused(output: str, shard_dir: Path) -> None:
    """Rewritten in place, the same bytes, once the output is being written: its sha256 no longer
    vouches for what was read, so nothing is written under the output's name."""
    path = shard_dir / "rank1-of-2.safetensors"
    shards = ShardSet.open(shard_dir)
    hashed = sum(entry["bytes"] for entry in shards.manifest.files)  # all the checks count, the rest is written
    done = [0]

    def rewrite_once_writing(size: int) -> None:
        done[0] += size
        if done[0] > hashed and size:
            done[0] = -(1 << 60)  # once
            path.write_bytes(path.read_bytes())

    out = shard_dir.parent / "out"
    with pytest.raises(TpshardError, match="changed") as failed:
        if output == "reshard":
            reshard(shards, 4, out, progress=rewrite_once_writing)
        else:
            merge_to(shards, out, output, progress=rewrite_once_writing)
    assert str(failed.value).startswith(f"{path}: ") and done[0] < 0
    assert sorted(p.name for p in shard_dir.parent.iterdir()) == ["shards"]


def test_a_full_disk_on_the_writer_thread_is_one_line(
    bias_ckpt: Path, shard_dir: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while a full buffer is written on an OutputFile's writer thread (buffers of 4 kB:
    the tiny model fills many), in every writer: one line, nothing left behind, not even a temporary."""
    monkeypatch.setattr(tensorfile, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(tensorfile, "BUFFERS", 2)
    real_writev = os.writev
    failed_on = set()

    def writev(fd: int, buffers: list) -> int:
        if threading.current_thread().name != "tpshard-write":
            return real_writev(fd, buffers)
        failed_on.add(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", writev)
    work = shard_dir.parent
    before = sorted(p.name for p in work.iterdir())
    runs = [["split", bias_ckpt, "--tp", 2, "-o", work / "s"], ["reshard", shard_dir, "--tp", 4, "-o", work / "tp4"]]
    runs += [["merge", shard_dir, "-o", work / fmt, "--format", fmt] for fmt in ("pt", "safetensors", "hf", "dcp")]
    for argv in runs:
        failed_on.clear()
        err = one_line_error(*cli(*argv))
        assert "writing failed" in err and os.strerror(errno.ENOSPC) in err and failed_on, (argv, err)
    assert sorted(p.name for p in work.iterdir()) == before


def test_merge_refuses_a_missing_rank_file(shard_dir: Path, cli) -> None:
    (shard_dir / "rank1-of-2.safetensors").unlink()
    err = one_line_error(*cli("merge", shard_dir, "-o", shard_dir.parent / "merged.pt"))
    assert str(shard_dir / "rank1-of-2.safetensors") in err and "missing" in err


def test_merge_refuses_an_unknown_format_version(shard_dir: Path, cli) -> None:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["format_version"] = 99
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    err = one_line_error(*cli("merge", shard_dir, "-o", shard_dir.parent / "merged.pt"))
    assert "format version 99" in err and "not supported" in err


def test_merge_freezes_what_it_imported_before_it_writes_and_main_before_the_end(
    shard_dir: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI puts torch's objects out of the collector's reach once merge has imported them (DCP's
    import and planner set off full collections that would walk them), and main() the rest before
    the process ends (finalization's collections); the cli fixture gives them back."""
    events = []
    real_merge_to = convert.merge_to

    def merge_to(*args: object, **kwargs: object) -> None:
        events.append("merge")
        real_merge_to(*args, **kwargs)

    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    monkeypatch.setattr(convert, "merge_to", merge_to)
    code, _, err = cli("merge", shard_dir, "-o", tmp_path / "merged.pt")
    assert code == 0, err
    assert events == ["freeze", "merge", "freeze"]
