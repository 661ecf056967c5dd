"""What a path given by the user is: the one place that decides, from the file system and a look at
headers (no tensor is read). Callers word their own errors for the kinds they do not take."""

from enum import StrEnum
from pathlib import Path

from tpshard.errors import TpshardError
from tpshard.files.checkpoint import Checkpoint
from tpshard.files.dcp import is_dcp_directory, load_dcp
from tpshard.files.dense_safetensors import load_safetensors_checkpoint
from tpshard.files.hf import is_hf_directory, load_hf
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.nanogpt import load_nanogpt
from tpshard.files.shardset import FORMAT, ShardSet
from tpshard.files.tensorfile import open_safetensors

NANOGPT_FILE = "ckpt.pt"  # in an out_dir


class Kind(StrEnum):
    MISSING = "nothing there"
    SHARD_SET = "shard directory"  # manifest.json inside
    HF_DIRECTORY = "Hugging Face GPT-2 directory"  # config.json inside
    DCP_DIRECTORY = "PyTorch distributed checkpoint (DCP)"  # .metadata inside
    NANOGPT_OUT_DIR = "nanoGPT out_dir"  # ckpt.pt inside, as train.py writes it and sample.py reads it
    OTHER_DIRECTORY = "directory"
    RANK_FILE = "rank file"  # a .safetensors with tpshard's metadata
    DENSE_SAFETENSORS = "dense safetensors"  # any other .safetensors: what merge --format safetensors writes
    NANOGPT = "nanoGPT ckpt.pt"  # any other file


def kind_of(path: Path) -> Kind:
    path = Path(path)
    if not path.exists():
        return Kind.MISSING
    if path.is_dir():
        if is_hf_directory(path):
            return Kind.HF_DIRECTORY
        if (path / MANIFEST).is_file() or (path / MANIFEST).is_symlink():  # a broken link: ShardSet.open says so
            return Kind.SHARD_SET
        if is_dcp_directory(path):
            return Kind.DCP_DIRECTORY
        return Kind.NANOGPT_OUT_DIR if (path / NANOGPT_FILE).is_file() else Kind.OTHER_DIRECTORY
    if path.suffix == ".safetensors" and path.is_file():
        return Kind.RANK_FILE if _has_tpshard_metadata(path) else Kind.DENSE_SAFETENSORS
    return Kind.NANOGPT


def _has_tpshard_metadata(path: Path) -> bool:
    try:
        with open_safetensors(path) as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except TpshardError:  # unreadable: the dense loader says why
        return False


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A dense checkpoint: a nanoGPT ckpt.pt or the out_dir that holds it, a dense .safetensors (`tpshard merge --format
    safetensors`), a Hugging Face GPT-2 directory or a DCP directory; validated, tensors memory-mapped, optimizer state
    left on disk."""
    path = Path(path)
    kind = kind_of(path)
    if kind is Kind.HF_DIRECTORY:
        return load_hf(path)
    if kind is Kind.DCP_DIRECTORY:
        return load_dcp(path)
    if kind in (Kind.DENSE_SAFETENSORS, Kind.RANK_FILE):
        return load_safetensors_checkpoint(path)
    return load_nanogpt(checkpoint_file(path))  # which says what is wrong with anything else


def checkpoint_file(path: Path) -> Path:
    """The ckpt.pt a path names: itself, or the one in a nanoGPT out_dir."""
    return path / NANOGPT_FILE if kind_of(path) is Kind.NANOGPT_OUT_DIR else path


def open_model_source(path: str | Path) -> Checkpoint | ShardSet:
    """What generate runs: a shard directory (the output of split), or a dense checkpoint."""
    path = Path(path)
    if kind_of(path) in (Kind.SHARD_SET, Kind.OTHER_DIRECTORY):
        return ShardSet.open(path)
    return load_checkpoint(path)
