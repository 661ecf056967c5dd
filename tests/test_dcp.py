"""PyTorch Distributed Checkpoint (DCP) in and out: tpshard -> DCP -> tpshard bit for bit; the export read
by torch itself (dcp.load into a plain nanoGPT, into a model parallelized with ColwiseParallel /
RowwiseParallel on a number of gloo processes other than the set's tp; format_utils.dcp_to_torch_save);
a DCP that torch wrote with dcp.save from 2 gloo processes read by every tpshard command; and damaged or
forged DCP directories refused with one line.

One launch of 2 gloo processes (module fixture `torch_side`) does both of torch's parts: it saves the
bias checkpoint's nanoGPT as DTensors, and loads tpshard's 4-way export resharded onto 2 ranks."""

import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files import dcp as tpdcp
from tpshard.files.checkpoint import model_args
from tpshard.files.paths import Kind, kind_of, load_checkpoint
from tpshard.model import GPT
from tpshard.runtime import launch
from tpshard.runtime.launch import Group
from tpshard.runtime.models import dense_model
from tpshard.testing import random_weights
from tpshard.verify import oracle

TOKENS = torch.randint(96, (2, 32), generator=torch.Generator().manual_seed(3))
# fp32 logits of PyTorch's tensor-parallel model against tpshard's dense one: the two sum the same products
# in a different order (the all-reduce of per-rank partials, per-part c_attn), which leaves differences of
# 9e-8 at |logits| <= 0.63 on this random model (measured: N=2 from a tp-4 set). verify's float32 default,
# atol 1e-4 + rtol 1e-5, is ~1000x that and far below what a wrong cut of c_attn does here (0.08).
ATOL, RTOL = 1e-4, 1e-5


def state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def one_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpshard: error: "), err
    return lines[0]


# --- tpshard -> DCP -> tpshard ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_round_trip_is_bit_exact(cli, bias_ckpt: Path, nobias_ckpt: Path, tmp_path: Path, dtype: str | None) -> None:
    for ckpt in (bias_ckpt, nobias_ckpt):
        name = ckpt.parent.name
        (tmp_path / name).mkdir()
        args = ("--dtype", dtype) if dtype else ()
        assert cli("split", ckpt, "--tp", 2, "-o", tmp_path / name / "shards", *args)[0] == 0
        code, _, err = cli("merge", tmp_path / name / "shards", "--format", "dcp", "-o", tmp_path / name / "dcp")
        assert code == 0, err
        export = tmp_path / name / "dcp"
        assert kind_of(export) is Kind.DCP_DIRECTORY
        assert sorted(p.name for p in export.iterdir()) == [".metadata", "__0_0.distcp", "meta.pkl", "tpshard.json"]
        original, back = load_checkpoint(ckpt), load_checkpoint(export)
        expected = {k: v.to(getattr(torch, dtype)) if dtype else v for k, v in original.state_dict.items()}
        state_equal(back.state_dict, expected)
        assert back.config == original.config
        assert (back.iter_num, back.best_val_loss, back.train_config) == (
            original.iter_num,
            original.best_val_loss,
            original.train_config,
        )
        # torch's own converter gives back the same bytes: c_attn as (3, C, C), nanoGPT's (3C, C) viewed
        dcp_to_torch_save(export, tmp_path / name / "torch.pt")
        saved = torch.load(tmp_path / name / "torch.pt", weights_only=True)
        C = original.config.n_embd
        assert saved["transformer.h.0.attn.c_attn.weight"].shape == (3, C, C)
        state_equal({k: v.reshape(expected[k].shape) for k, v in saved.items()}, expected)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_plain_nanogpt_loads_the_export(bias_ckpt: Path, tmp_path: Path, nanogpt) -> None:
    """In one process, with nanoGPT's own model: the README's lines, c_attn loaded through (3, C, C) views."""
    original = load_checkpoint(bias_ckpt)
    tpdcp.save_dcp(original, tmp_path / "dcp")
    model = nanogpt(json.loads((tmp_path / "dcp" / "tpshard.json").read_text())["model_args"])
    state = model.state_dict()
    with pytest.raises(CheckpointException, match=re.escape("Size mismatch between saved torch.Size([3, 32")):
        dcp.load(dict(state), checkpoint_id=tmp_path / "dcp", no_dist=True)  # the fused view: refused by torch
    views = {k: v.view(3, -1, *v.shape[1:]) if ".c_attn." in k else v for k, v in state.items()}
    dcp.load(views, checkpoint_id=tmp_path / "dcp", no_dist=True)
    state_equal(model.state_dict(), original.state_dict)
    with torch.no_grad():
        logits = model(TOKENS)
        dense = dense_model(original)(TOKENS)
    torch.testing.assert_close(logits, dense, atol=ATOL, rtol=RTOL)


def test_output_is_all_or_nothing(bias_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = load_checkpoint(bias_ckpt)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.distributed.checkpoint, "save", full_disk)
    with pytest.raises(TpshardError, match=r"writing failed \(No space left on device\); .* is unchanged"):
        tpdcp.save_dcp(original, tmp_path / "dcp")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary
    monkeypatch.undo()
    tpdcp.save_dcp(original, tmp_path / "dcp")
    with pytest.raises(TpshardError, match="already exists"):
        tpdcp.save_dcp(original, tmp_path / "dcp")


# --- torch's side: dcp.save from 2 gloo processes; the export resharded onto 2 ranks -----------------


def torch_side_on_rank(
    group: Group, ckpt: str, config: GPTConfig, saved: str, export: str, tokens: torch.Tensor, logits: str
) -> None:
    """(1) nanoGPT's model (fused c_attn) with the checkpoint's weights, parallelized with PyTorch's plan,
    saved by dcp.save from every rank; (2) tpshard's export loaded into PyTorch's tensor-parallel model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    model = oracle.TorchGPT(config, tpdcp.FUSED)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    parallelize_module(model, init_device_mesh("cpu", (group.world_size,)), oracle.tp_plan(config, tpdcp.FUSED))
    state = model.state_dict()
    assert isinstance(state["transformer.h.0.mlp.c_fc.weight"], DTensor)
    dcp.save({"model": state, "step": torch.tensor(7)}, checkpoint_id=saved)  # model. prefix, as training loops do

    parallel = oracle.parallel_model(config, torch.float32, group.device)
    oracle.load_export(parallel, export)
    assert parallel.transformer.h[0].attn.c_attn.weight.to_local().shape == (3, config.n_embd // 2, config.n_embd)
    with torch.no_grad():
        out = parallel(tokens)
    if group.rank == 0:
        torch.save(out, logits)


@pytest.fixture(scope="module")
def torch_side(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch_side")
    original = load_checkpoint(bias_ckpt)
    split_checkpoint(original, 4, root / "tp4")  # a 4-way set, loaded on 2 ranks
    from tpshard.convert import merge_shards
    from tpshard.files.shardset import ShardSet

    tpdcp.save_dcp(merge_shards(ShardSet.open(root / "tp4")), root / "export")
    args = (str(bias_ckpt), original.config, str(root / "saved"), str(root / "export"), TOKENS, str(root / "logits"))
    launch.run(torch_side_on_rank, args, nproc=2, device="cpu")
    return {"saved": root / "saved", "logits": root / "logits", "root": root}


def test_export_reshards_onto_pytorch_tensor_parallelism(torch_side: dict, bias_ckpt: Path) -> None:
    logits = torch.load(torch_side["logits"], weights_only=True)
    with torch.no_grad():
        dense = dense_model(load_checkpoint(bias_ckpt))(TOKENS)
    torch.testing.assert_close(logits, dense, atol=ATOL, rtol=RTOL)


def test_dcp_written_by_torch_is_read_by_every_command(cli, torch_side: dict, bias_ckpt: Path) -> None:
    saved, root = torch_side["saved"], torch_side["root"]
    assert sorted(p.name for p in saved.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    entries = tpdcp.read_metadata(saved).state_dict_metadata  # each rank wrote its own rows of the sharded ones
    assert len(entries["model.transformer.h.0.mlp.c_fc.weight"].chunks) == 2
    assert entries["model.transformer.h.0.attn.c_attn.weight"].size == (3 * 32, 32)  # nanoGPT's fused layout
    line = one_line(*cli("inspect", saved)[::2])
    assert "without model_args" in line and f"{saved / 'tpshard.json'}" in line and '"n_head": N' in line

    (saved / "tpshard.json").write_text(json.dumps({"model_args": {"n_head": 4}}))  # the rest read off the shapes
    original = load_checkpoint(bias_ckpt)
    read = load_checkpoint(saved)
    state_equal(read.state_dict, original.state_dict)
    assert read.config == original.config and read.has_optimizer  # "step" left unread

    code, out, err = cli("inspect", saved)
    assert code == 0 and "PyTorch distributed checkpoint (DCP)" in out, err
    assert cli("split", saved, "--tp", 2, "-o", root / "from_torch")[0] == 0
    code, out, err = cli("verify", root / "from_torch", "--against", saved, "--tokens", 2, "--batch", 1)
    assert code == 0 and "PASS" in out, out + err
    shutil.copy(bias_ckpt.parent / "meta.pkl", saved)
    code, out, err = cli("generate", saved, "--prompt", "ab", "--max-new-tokens", 5, "--seed", 1)
    assert code == 0, err


# --- bad input: one line, exit 2 ------------------------------------------------------------------------


@pytest.fixture
def export(bias_ckpt: Path, tmp_path: Path) -> Path:
    tpdcp.save_dcp(load_checkpoint(bias_ckpt), tmp_path / "dcp")
    return tmp_path / "dcp"


def forge(export: Path, change) -> None:
    """Rewrite .metadata after change(metadata) (pickled with DCP's own classes, as torch writes it)."""
    metadata = pickle.loads((export / ".metadata").read_bytes())
    change(metadata)
    (export / ".metadata").write_bytes(pickle.dumps(metadata))


def test_no_model_args(cli, export: Path) -> None:
    (export / "tpshard.json").unlink()
    line = one_line(*cli("split", export, "--tp", 2, "-o", export.parent / "out")[::2])
    assert "without model_args" in line and "tpshard.json" in line
    assert not (export.parent / "out").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda data: data[: len(data) // 2], "unreadable DCP metadata"),
        (lambda data: b"", "file is empty"),
        (lambda data: b"\x80\x04K\x01.", "holds an object of type int, not DCP Metadata"),
        (lambda data: bytes(b ^ 0x5A for b in data), "unreadable DCP metadata"),
    ],
)
def test_damaged_metadata(cli, export: Path, damage, expected: str) -> None:
    data = (export / ".metadata").read_bytes()
    (export / ".metadata").write_bytes(damage(data))
    assert expected in one_line(*cli("inspect", export)[::2])


def test_metadata_that_would_run_code_is_refused(cli, export: Path, tmp_path: Path) -> None:
    """torch 2.13's FileSystemReader unpickles .metadata with plain pickle: this one would run a command."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    forge(export, lambda m: setattr(m, "planner_data", Payload()))
    line = one_line(*cli("inspect", export)[::2])
    assert "refused to unpickle: refers to posix.system" in line and "never runs code" in line
    assert not marker.exists()


def test_forged_storage_is_refused(cli, export: Path) -> None:
    def outside(m: object) -> None:
        for info in m.storage_data.values():
            info.relative_path = "../elsewhere.distcp"

    forge(export, outside)
    assert "not a file name in the checkpoint's directory" in one_line(*cli("inspect", export)[::2])


def test_forged_shape_and_holes_are_refused(cli, export: Path) -> None:
    def hole(m: object) -> None:
        entry = m.state_dict_metadata["transformer.wpe.weight"]
        entry.chunks[0].sizes = torch.Size([16, 32])  # half of the table stored, the rest would be left unset

    forge(export, hole)
    assert "do not cover it exactly once" in one_line(*cli("inspect", export)[::2])


def test_truncated_data_file(cli, export: Path) -> None:
    data = export / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    assert "is the file truncated?" in one_line(*cli("inspect", export)[::2])


def test_compressed_piece_is_refused(export: Path) -> None:
    """A torch.save archive whose records are deflated would be inflated whole into memory."""
    import zipfile

    metadata = pickle.loads((export / ".metadata").read_bytes())
    infos = sorted(metadata.storage_data.values(), key=lambda i: i.offset)
    data = (export / "__0_0.distcp").read_bytes()
    first = infos[0]
    packed = io.BytesIO()
    original = zipfile.ZipFile(io.BytesIO(data[first.offset : first.offset + first.length]))
    with original as src, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    piece = packed.getvalue().ljust(first.length, b"\0")[: first.length]
    (export / "__0_0.distcp").write_bytes(data[: first.offset] + piece + data[first.offset + first.length :])
    with pytest.raises(TpshardError, match="is compressed, which DCP never writes"):
        load_checkpoint(export)


@pytest.mark.parametrize(("tp", "pp", "vocab_parallel"), [(2, 1, False), (4, 2, True), (1, 3, False), (3, 1, True)])
def test_merge_to_dcp_stores_each_rank_piece_as_a_chunk(
    tmp_path: Path, cli, tp: int, pp: int, vocab_parallel: bool
) -> None:
    """merge --format dcp writes the rank files' pieces as they are (a chunk of its tensor each, no
    dense tensor made): what torch's dcp.load and tpshard read back is the dense model, bit for bit."""
    config = GPTConfig(block_size=16, vocab_size=61, n_layer=3, n_head=12, n_embd=48, bias=True)
    model = random_weights(GPT(config), seed=tp * 10 + pp)
    torch.save({"model": model.state_dict(), "model_args": model_args(config)}, tmp_path / "ckpt.pt")
    dense = load_checkpoint(tmp_path / "ckpt.pt")
    split_checkpoint(dense, tp, tmp_path / "s", pp=pp, vocab_parallel=vocab_parallel)
    assert cli("merge", tmp_path / "s", "-o", tmp_path / "dcp", "--format", "dcp")[0] == 0
    metadata = tpdcp.read_metadata(tmp_path / "dcp")
    qkv = metadata.state_dict_metadata["transformer.h.0.attn.c_attn.weight"]
    assert tuple(qkv.size) == (3, 48, 48) and len(qkv.chunks) == tp  # one chunk per rank, not one tensor
    back = load_checkpoint(tmp_path / "dcp")
    assert set(back.state_dict) == set(dense.state_dict)
    assert all(torch.equal(back.state_dict[k], t) for k, t in dense.state_dict.items())
    plain = {k: torch.empty_like(t) for k, t in dense.state_dict.items() if "c_attn" not in k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(plain, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert all(torch.equal(t, dense.state_dict[k]) for k, t in plain.items())
