"""Loading nanoGPT checkpoints: what training leaves in them (torch.compile's prefix, mask buffers, GPU
tensors, a large optimizer state), what must never run (pickled code), and one clear line for every
file that is not a usable checkpoint."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG

from tpshard.errors import TpshardError
from tpshard.files.checkpoint import COMPILE_PREFIX, model_args
from tpshard.files.paths import load_checkpoint
from tpshard.model import GPT
from tpshard.testing import random_weights


def raw_model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_compile_prefix_is_stripped(compiled_ckpt: Path) -> None:
    raw = raw_model(compiled_ckpt)
    assert all(name.startswith(COMPILE_PREFIX) for name in raw)
    ckpt = load_checkpoint(compiled_ckpt)
    assert set(ckpt.state_dict) == {name.removeprefix(COMPILE_PREFIX) for name in raw}
    for name, tensor in raw.items():
        assert torch.equal(ckpt.state_dict[name.removeprefix(COMPILE_PREFIX)], tensor)


def test_attention_mask_buffers_are_dropped(mask_ckpt: Path) -> None:
    masks = [name for name in raw_model(mask_ckpt) if name.endswith(".attn.bias")]
    assert len(masks) == BIAS_CONFIG.n_layer  # the fixture really has them
    state = load_checkpoint(mask_ckpt).state_dict
    assert not [name for name in state if name.endswith(".attn.bias")]
    assert "transformer.h.0.attn.c_attn.bias" in state  # a real bias, not to be confused with the mask
    GPT(BIAS_CONFIG).load_state_dict(state)  # strict: exactly the model's parameters


def as_if_saved_on_gpu(path: Path) -> None:
    """Rewrite the archive's storage locations from 'cpu' to 'cuda:0', exactly what torch.save records
    for tensors that lived on a GPU: loading then needs CUDA unless map_location says otherwise."""
    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries:
            if name.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(name, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to show the failure")
def test_gpu_saved_tensors_load_on_a_cpu_machine(make_checkpoint) -> None:
    path = make_checkpoint(optimizer=False)
    expected = raw_model(path)
    as_if_saved_on_gpu(path)
    with pytest.raises(RuntimeError, match="CUDA"):  # what nanoGPT's own loader would hit without a GPU
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path)  # map_location="cpu"
    for name, tensor in expected.items():
        assert ckpt.state_dict[name].device.type == "cpu"
        assert torch.equal(ckpt.state_dict[name], tensor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to save tensors from a GPU for real")
def test_cuda_saved_checkpoint_loads_to_cpu(tmp_path: Path) -> None:
    model = random_weights(GPT(BIAS_CONFIG)).cuda()
    torch.save({"model": model.state_dict(), "model_args": model_args(BIAS_CONFIG)}, tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    for name, tensor in model.state_dict().items():
        assert ckpt.state_dict[name].device.type == "cpu"
        assert torch.equal(ckpt.state_dict[name], tensor.cpu())


RSS_PROBE = textwrap.dedent(
    """
    import sys, torch
    from tpshard.files.paths import load_checkpoint

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    load_checkpoint(sys.argv[2])  # the same model without optimizer: first-call imports and caches
    before = rss()
    ckpt = load_checkpoint(sys.argv[1])
    assert ckpt.has_optimizer
    lazy = rss() - before
    before = rss()
    everything = torch.load(sys.argv[1], weights_only=True)  # the control: what reading it all costs
    print(lazy, rss() - before)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_optimizer_state_is_never_read(tmp_path: Path) -> None:
    """A checkpoint whose optimizer state is 128 MB loads in under 8 MB of RSS (measured: well under
    1 MB): the file is memory-mapped, and only the model's tensors are ever touched (here, not even
    those). The control, a plain torch.load, grows RSS by the whole file."""
    optimizer_bytes = 128 << 20
    model = random_weights(GPT(BIAS_CONFIG))
    moments = torch.ones(optimizer_bytes // 8)  # two float32 moments, 64 MB each
    state = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": moments, "exp_avg_sq": moments.clone()}}}
    state["param_groups"] = [{"params": [0], "lr": 1e-3}]
    ckpt = {"model": model.state_dict(), "optimizer": state, "model_args": model_args(BIAS_CONFIG)}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    del ckpt["optimizer"], moments, state
    torch.save(ckpt, tmp_path / "warmup.pt")
    args = [sys.executable, "-c", RSS_PROBE, str(tmp_path / "ckpt.pt"), str(tmp_path / "warmup.pt")]
    lazy, control = map(int, subprocess.run(args, capture_output=True, text=True, check=True).stdout.split())
    assert control > optimizer_bytes  # the probe sees a full read
    assert lazy < 8 << 20, f"loading grew RSS by {lazy / 1e6:.1f} MB"


class CreatesAFile:
    """A pickle payload: unpickling it calls os.system, which creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, cli) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    state = random_weights(GPT(BIAS_CONFIG)).state_dict()
    torch.save({"model": state, "model_args": model_args(BIAS_CONFIG), "config": CreatesAFile(marker)}, path)
    torch.load(path, weights_only=False)  # the control: a plain unpickle runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(TpshardError, match="refused to unpickle"):
        load_checkpoint(path)
    code, _, err = cli("split", path, "--tp", "2", "-o", tmp_path / "out")
    assert code == 2 and "refused to unpickle" in err and "never runs code" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --- every unusable file: one line on stderr, exit 2, through the real entry point ---------------------


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase its error must contain)."""
    good = folder / "good.pt"
    model = random_weights(GPT(BIAS_CONFIG)).state_dict()
    torch.save({"model": model, "model_args": model_args(BIAS_CONFIG)}, good)
    (folder / "empty.pt").touch()
    (folder / "text.pt").write_text("step,loss\n1,4.2\n")
    (folder / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"state_dict": model}, folder / "not_nanogpt.pt")
    wrong_args = {**model_args(BIAS_CONFIG), "n_embd": 2 * BIAS_CONFIG.n_embd}
    torch.save({"model": model, "model_args": wrong_args}, folder / "wrong_shapes.pt")
    (folder / "a_directory").mkdir()
    return {
        "missing": (folder / "missing.pt", "no such file"),
        "directory": (folder / "a_directory", "directory"),
        "empty": (folder / "empty.pt", "empty"),
        "not a torch file": (folder / "text.pt", "not a PyTorch checkpoint"),
        "truncated": (folder / "truncated.pt", "truncated"),
        "no model/model_args": (folder / "not_nanogpt.pt", "needs 'model' and 'model_args'"),
        "shapes inconsistent": (folder / "wrong_shapes.pt", "model_args imply"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return bad_files(tmp_path_factory.mktemp("bad"))


CASES = ["missing", "directory", "empty", "not a torch file", "truncated", "no model/model_args", "shapes inconsistent"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["split", "inspect"])
def test_unusable_checkpoint_is_one_line_exit_2(bad: dict, case: str, command: str, tmp_path: Path, cli) -> None:
    path, phrase = bad[case]
    args = ["split", path, "--tp", "2", "-o", tmp_path / "out"] if command == "split" else ["inspect", path]
    code, out, err = cli(*args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("tpshard: error: "), err
    assert str(path) in err
    if not (command == "inspect" and case == "directory"):  # inspect words a bare directory its own way
        assert phrase in err
    assert not (tmp_path / "out").exists()


def test_error_line_from_the_installed_command(tmp_path: Path) -> None:
    """The same contract end to end, in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "tpshard", "inspect", str(tmp_path / "nope.pt")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"tpshard: error: {tmp_path / 'nope.pt'}: no such file or directory\n"


def test_merged_checkpoint_has_no_optimizer_to_leave_out(bias_ckpt: Path, tmp_path: Path, cli) -> None:
    assert load_checkpoint(bias_ckpt).has_optimizer
    code, _, err = cli("split", bias_ckpt, "--tp", "2", "-o", tmp_path / "s")
    assert code == 0, err
    code, _, err = cli("merge", tmp_path / "s", "-o", tmp_path / "merged.pt")
    assert code == 0, err
    assert torch.load(tmp_path / "merged.pt", weights_only=True)["optimizer"] is None
    assert not load_checkpoint(tmp_path / "merged.pt").has_optimizer
