"""Pickles that run code when unpickled normally: a ckpt.pt, a meta.pkl and a Hugging Face pytorch_model.bin.
tpshard refuses each one, through every command that reads it, and the code never runs: each payload
creates a marker file when unpickled the ordinary way (checked first, so that the payloads are known to
be live), and the marker must never appear.
"""

import ast
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG, write_nanogpt_checkpoint
from safetensors.torch import save_file

from tpshard.convert import split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import model_args
from tpshard.files.hf import hf_state_dict
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.testing import random_weights
from tpshard.tokenizer import load_meta_pkl, load_tokenizer_file

TPSHARD = Path(__file__).resolve().parents[1] / "tpshard"

# --- payloads: three ways to run code from a pickle ----------------------------------------------------------


class System:
    """os.system("touch MARKER")"""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class Open:
    """open(MARKER, "w"): no shell, just a builtin with a side effect."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class Exec:
    """exec(source): anything at all."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('ran')",)


PAYLOADS = {"os.system": System, "builtins.open": Open, "builtins.exec": Exec}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code ran"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_payloads_are_live(payload: str, protocol: int, marker: Path) -> None:
    """The control: an ordinary unpickle runs each payload. The tests below are only worth something
    because of this one."""
    pickle.loads(pickle.dumps(PAYLOADS[payload](marker), protocol=protocol))
    assert marker.exists()


# --- ckpt.pt -----------------------------------------------------------------------------------------------


def nanogpt(marker: Path, payload: type, where: str) -> object:
    """A train.py-style checkpoint with the payload hidden at `where`."""
    evil = payload(marker)
    state = random_weights(GPT(BIAS_CONFIG), seed=0).state_dict()
    ckpt = {"model": state, "model_args": model_args(BIAS_CONFIG), "optimizer": {"state": {}}, "config": {}}
    if where == "the whole file":
        return evil
    if where == "a tensor":
        state["transformer.wte.weight"] = evil
    elif where == "model_args":
        ckpt["model_args"] = {**ckpt["model_args"], "n_layer": evil}
    elif where == "the optimizer state":  # never used by tpshard, still unpickled with the rest
        ckpt["optimizer"] = {"state": {0: {"exp_avg": evil}}}
    else:
        ckpt[where] = evil
    return ckpt


PLACES = ["the whole file", "a tensor", "model_args", "the optimizer state", "config", "iter_num"]


def write_pickle_archive(path: Path, data_pkl: bytes) -> Path:
    """A torch zip archive around a data.pkl of our own making (any pickle protocol)."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    writer.write_record("byteorder", b"little", 6)
    writer.write_end_of_file()
    return path


def evil_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """Every way we know to put code into a ckpt.pt, as name -> file (each beside a good meta.pkl)."""
    folder.mkdir()
    files = {}
    for place in PLACES:
        for name, payload in PAYLOADS.items():
            path = folder / f"{name} in {place}.pt"
            torch.save(nanogpt(marker, payload, place), path)
            files[f"{name} in {place}"] = path
    for protocol in (0, 4, 5):  # torch.save writes protocol 2; a forged archive may hold any
        data = pickle.dumps(nanogpt(marker, System, "config"), protocol=protocol)
        files[f"data.pkl of protocol {protocol}"] = write_pickle_archive(folder / f"protocol {protocol}.pt", data)
    legacy = folder / "legacy.pt"  # the pre-1.6 format: a bare pickle stream, no zip
    torch.save(nanogpt(marker, System, "config"), legacy, _use_new_zipfile_serialization=False)
    files["legacy format"] = legacy
    bare = folder / "bare.pt"
    bare.write_bytes(pickle.dumps(nanogpt(marker, System, "config")))
    files["a bare pickle"] = bare
    return files


@pytest.fixture
def evil(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = evil_checkpoints(tmp_path / "evil", marker)
    assert not marker.exists()  # torch.save only records the call
    return files


def test_every_evil_checkpoint_is_live(evil: dict[str, Path], marker: Path) -> None:
    """The control for the files: an ordinary load runs every one of them."""
    for name, path in evil.items():
        try:
            if name == "a bare pickle":
                pickle.loads(path.read_bytes())
            else:
                torch.load(path, weights_only=False)
        except Exception:
            pass  # a payload in place of a tensor can make the load fail afterwards: the code ran already
        assert marker.exists(), name
        marker.unlink()


def test_evil_checkpoints_are_refused_by_the_loader(evil: dict[str, Path], marker: Path) -> None:
    for name, path in evil.items():
        with pytest.raises(TpshardError) as refusal:
            load_checkpoint(path)
        message = str(refusal.value)
        assert str(path) in message, name
        if "legacy" not in name and "bare" not in name:  # those are refused for not being zip archives
            assert "refused to unpickle" in message and "never runs code" in message, (name, message)
        assert not marker.exists(), name


def test_forcing_torch_to_unpickle_code_is_ignored(evil: dict[str, Path], marker: Path, monkeypatch) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch.load's default to full unpickling; tpshard asks for
    weights_only explicitly, which the variable does not override."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(TpshardError, match="refused to unpickle"):
        load_checkpoint(evil["os.system in config"])
    assert not marker.exists()


COMMANDS: dict[str, Callable[[Path, Path, Path], list]] = {  # (checkpoint, output, a good shard set) -> argv
    "split": lambda src, out, _: ["split", src, "--tp", 2, "-o", out],
    "inspect": lambda src, out, _: ["inspect", src],
    "generate": lambda src, out, _: ["generate", src, "--max-new-tokens", 2, "--prompt", "ab"],
    "verify": lambda src, out, shards: ["verify", shards, "--against", src, "--tokens", 1],
}


@pytest.fixture(scope="module")
def good_shards(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "shards"
    split_checkpoint(load_checkpoint(bias_ckpt), 2, out)
    return out


def implemented(command: str) -> bool:
    from tpshard.cli.app import app

    callback = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    return not (callback.__doc__ or "").strip().startswith("Not implemented")


@pytest.mark.parametrize("command", COMMANDS)
def test_evil_checkpoints_are_refused_by_every_command(
    command: str, evil: dict[str, Path], marker: Path, good_shards: Path, tmp_path: Path, cli
) -> None:
    if not implemented(command):
        pytest.skip(f"tpshard {command} is not implemented yet")
    for name, path in evil.items():
        code, out, err = cli(*COMMANDS[command](path, tmp_path / "out", good_shards))
        assert code == 2 and out == "" and err.count("\n") == 1 and path.name in err, (name, code, err)
        assert not marker.exists(), name
        assert not (tmp_path / "out").exists()


def test_refused_by_the_installed_command(evil: dict[str, Path], marker: Path, tmp_path: Path) -> None:
    """The same in a process of its own, as a user runs it: exactly one line on stderr (torch's warning
    about the forged archive's pickle protocol 5 included in nothing)."""
    argv = ["split", evil["data.pkl of protocol 5"], "--tp", "2", "-o", tmp_path / "o"]
    result = subprocess.run([sys.executable, "-m", "tpshard", *map(str, argv)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("tpshard: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "refused to unpickle" in result.stderr and "never runs code" in result.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


# --- meta.pkl ------------------------------------------------------------------------------------------------


def evil_meta(marker: Path, payload: type, protocol: int, hidden: bool) -> bytes:
    """The payload as the whole meta.pkl, or hidden inside a real-looking one."""
    evil = payload(marker)
    if not hidden:
        return pickle.dumps(evil, protocol=protocol)
    meta = {"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": evil}}
    return pickle.dumps(meta, protocol=protocol)


@pytest.mark.parametrize("hidden", [False, True], ids=["whole", "hidden"])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("payload", PAYLOADS)
def test_evil_meta_pkl_is_refused(payload: str, protocol: int, hidden: bool, marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "meta.pkl"
    path.write_bytes(evil_meta(marker, PAYLOADS[payload], protocol, hidden))
    for load in (load_meta_pkl, load_tokenizer_file):
        with pytest.raises(TpshardError, match="refused to unpickle"):
            load(path)
    no_suffix = tmp_path / "tokenizer.bin"  # told apart by content: a pickle starts with 0x80
    no_suffix.write_bytes(path.read_bytes())
    if protocol >= 2:
        with pytest.raises(TpshardError, match="refused to unpickle"):
            load_tokenizer_file(no_suffix)
    assert not marker.exists()


@pytest.fixture
def model_with_evil_meta(tmp_path: Path, marker: Path) -> Path:
    """A valid checkpoint, and beside it a meta.pkl that runs code."""
    ckpt = write_nanogpt_checkpoint(tmp_path / "model", BIAS_CONFIG)
    (ckpt.parent / "meta.pkl").write_bytes(evil_meta(marker, System, 2, hidden=True))
    return ckpt


def test_split_ships_no_evil_meta_pkl(model_with_evil_meta: Path, marker: Path, tmp_path: Path, cli) -> None:
    """split found a tokenizer it refuses: the shard set is written without one, and says why."""
    code, _, err = cli("split", model_with_evil_meta, "--tp", 2, "-o", tmp_path / "shards")
    assert code == 0, err
    assert "refused to unpickle" in " ".join(err.split())
    assert ShardSet.open(tmp_path / "shards").manifest.tokenizer is None
    assert not (tmp_path / "shards" / "meta.pkl").exists()
    assert not marker.exists()


def test_an_explicit_evil_tokenizer_stops_split(model_with_evil_meta: Path, marker: Path, tmp_path: Path, cli) -> None:
    tokenizer = model_with_evil_meta.parent / "meta.pkl"
    code, _, err = cli("split", model_with_evil_meta, "--tp", 2, "-o", tmp_path / "s", "--tokenizer", tokenizer)
    assert code == 2 and "refused to unpickle" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists() and not marker.exists()


def test_generate_refuses_an_evil_meta_pkl_wherever_it_is_found(
    model_with_evil_meta: Path, marker: Path, tmp_path: Path, cli, monkeypatch
) -> None:
    """Beside the checkpoint, inside a shard set, and in data/<dataset>/ (where nanoGPT's sample.py looks)."""
    run = ["--max-new-tokens", 2, "--prompt", "ab"]
    code, _, err = cli("generate", model_with_evil_meta, *run)
    assert code == 2 and "refused to unpickle" in err

    good = write_nanogpt_checkpoint(tmp_path / "good", BIAS_CONFIG)
    assert cli("split", good, "--tp", 2, "-o", tmp_path / "shards")[0] == 0
    (tmp_path / "shards" / "meta.pkl").write_bytes((model_with_evil_meta.parent / "meta.pkl").read_bytes())
    code, _, err = cli("generate", tmp_path / "shards", *run)
    assert code == 2 and "refused to unpickle" in err

    (good.parent / "meta.pkl").unlink()
    dataset = torch.load(good, weights_only=True)["config"]["dataset"]
    (tmp_path / "data" / dataset).mkdir(parents=True)
    (tmp_path / "data" / dataset / "meta.pkl").write_bytes((model_with_evil_meta.parent / "meta.pkl").read_bytes())
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("generate", good, *run)
    assert code == 2 and "refused to unpickle" in err
    assert not marker.exists()


def test_inspect_never_runs_an_evil_meta_pkl(model_with_evil_meta: Path, marker: Path, cli) -> None:
    """inspect describes the checkpoint (its tokenizer may be reported as refused); the code never runs."""
    code, _, err = cli("inspect", model_with_evil_meta)
    assert code in (0, 2) and "Traceback" not in err
    assert not marker.exists()


# --- a Hugging Face directory's pytorch_model.bin ----------------------------------------------------------


def hf_directory(folder: Path, marker: Path, *, safetensors_too: bool = False) -> Path:
    """config.json, and a pytorch_model.bin whose pickle runs code (its tensors otherwise real)."""
    folder.mkdir()
    ckpt = load_checkpoint(write_nanogpt_checkpoint(folder.parent / f"{folder.name} source", BIAS_CONFIG))
    state = hf_state_dict(ckpt)
    config = {"model_type": "gpt2", "vocab_size": 96, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({**state, "h.0.attn.masked_bias": System(marker)}, folder / "pytorch_model.bin")
    if safetensors_too:
        save_file(state, str(folder / "model.safetensors"))
    return folder


def test_evil_pytorch_model_bin_is_refused(tmp_path: Path, marker: Path, good_shards: Path, cli) -> None:
    folder = hf_directory(tmp_path / "gpt2", marker)
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the control
    assert marker.exists()
    marker.unlink()
    with pytest.raises(TpshardError, match="refused to unpickle"):
        load_checkpoint(folder)
    for command, argv in COMMANDS.items():
        if implemented(command):
            code, _, err = cli(*argv(folder, tmp_path / "out", good_shards))
            assert code == 2 and "pytorch_model.bin" in err and err.count("\n") == 1, (command, err)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_model_safetensors_is_preferred_to_pytorch_model_bin(tmp_path: Path, marker: Path, cli) -> None:
    """With both present the .bin is never opened: safetensors holds no code."""
    folder = hf_directory(tmp_path / "gpt2", marker, safetensors_too=True)
    code, _, err = cli("split", folder, "--tp", 2, "-o", tmp_path / "shards")
    assert code == 0, err
    ShardSet.open(tmp_path / "shards").check_file(1)
    assert not marker.exists()


# --- and no other door: every unpickling in tpshard is a restricted one -------------------------------------

# torch.load is allowed anywhere with weights_only=True (torch's restricted unpickler); any other way to
# unpickle only in tokenizer.py, whose unpickler refuses every global
# the restricted doors: meta.pkl (no globals at all), DCP's .metadata (its metadata classes only; tests/test_dcp.py)
ALLOWED = {("tokenizer.py", "pickle.Unpickler"), ("dcp.py", "pickle.Unpickler")}
UNPICKLERS = {
    "torch.load",
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "marshal.loads",
    "shelve.open",
    "numpy.load",
    "np.load",
    "eval",
    "exec",
    "torch.serialization.add_safe_globals",
    "torch.serialization.safe_globals",
    "add_safe_globals",
}


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def test_tpshard_unpickles_only_through_restricted_unpicklers() -> None:
    """A static guard: a new torch.load without weights_only=True, a pickle.load, an eval... anywhere in
    tpshard fails here, before it can be shipped."""
    found = []
    for path in sorted(TPSHARD.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Call):
                names.append(dotted(node.func))
            if isinstance(node, ast.ClassDef):  # subclassing an unpickler is using one
                names += [dotted(base) for base in node.bases]
            for name in names:
                if name in UNPICKLERS:
                    found.append((path.name, name, node))
    for file, name, node in found:
        where = f"{file}:{node.lineno}: {name}"
        if name == "torch.load":
            flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, f"{where} without weights_only=True"
        else:
            assert (file, name) in ALLOWED, f"{where} (unpickles, or runs code)"
    doors = {(f, n) for f, n, _ in found}
    assert ("nanogpt.py", "torch.load") in doors and ("tokenizer.py", "pickle.Unpickler") in doors


def test_the_meta_pkl_unpickler_refuses_every_global() -> None:
    """tokenizer.py's door: even harmless globals are refused (a meta.pkl needs none)."""
    from tpshard import tokenizer

    for value in ({1, 2}, complex(1, 2), range(3)):  # builtins.set, builtins.complex, builtins.range
        path_bytes = pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": {"a": 0}, "x": value}, protocol=2)
        with pytest.raises(pickle.UnpicklingError):
            tokenizer._NoGlobalsUnpickler(io.BytesIO(path_bytes)).load()
