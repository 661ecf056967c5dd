"""nanoGPT's ckpt.pt, as train.py writes it and sample.py reads it: safe, lazy loading and atomic,
streamed saving.

Loading never unpickles code (weights_only=True) and memory-maps the file, so the optimizer state,
often twice the model's size, is never read from disk. Saving writes torch.save's own file one tensor
at a time (files/torchzip.py), so that a merge never holds the dense model.
"""

import pickle
import warnings
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from tpshard.errors import TpshardError, first_line
from tpshard.files.atomic import atomic_write, file_status
from tpshard.files.checkpoint import Checkpoint, clean_state_dict, config_from_model_args, model_args, training_record
from tpshard.files.tensorfile import Progress, in_reused_memory, layout_of
from tpshard.files.torchzip import Deferred, save_streamed
from tpshard.parallel.plan import TIED


def read_checkpoint_file(path: Path) -> dict:
    """torch.load, weights only and memory-mapped, with every failure turned into one clear line."""
    path = Path(path)
    if not path.exists():
        _, problem = file_status(path)  # a link loop or a link to nothing, rather than "no such file"
        raise TpshardError(f"{path}: {'no such file' if problem in (None, 'missing') else 'is ' + problem}")
    if path.is_dir():
        raise TpshardError(f"{path}: is a directory, expected a checkpoint file (ckpt.pt)")
    if path.stat().st_size == 0:
        raise TpshardError(f"{path}: file is empty")
    if not _is_zip(path):
        raise TpshardError(
            f"{path}: not a PyTorch checkpoint (no zip archive: truncated, or saved in the legacy format; "
            "re-save it with torch.save)"
        )
    _check_uncompressed(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise TpshardError(
            f"{path}: refused to unpickle: the file holds more than tensors and plain data ({first_line(e)}); "
            "tpshard never runs code from a checkpoint"
        ) from None
    except Exception as e:  # a damaged pickle fails in the unpickler's own ways: KeyError, TypeError, IndexError...
        raise TpshardError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line(e)}); is the file truncated or damaged?"
        ) from None


def _check_uncompressed(path: Path) -> None:
    """torch.save stores every record as is. A compressed one is inflated whole into memory when torch
    reads it: a 1 MB file can hold a 1 GB record. Refused from the zip directory, before torch opens it."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [i for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except Exception as e:  # zipfile's many ways of failing: BadZipFile, EOFError, NotImplementedError...
        raise TpshardError(
            f"{path}: unreadable zip archive ({type(e).__name__}: {first_line(e)}); is it damaged?"
        ) from None
    if packed:
        raise TpshardError(
            f"{path}: {packed[0].filename} is compressed ({packed[0].file_size:,} bytes inflated), which "
            "torch.save never does; refused unread (re-save the checkpoint with torch.save)"
        )


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # raised, not answered False, for some damaged end records
        return False
    except OSError as e:
        raise TpshardError(f"{path}: cannot read ({e.strerror})") from None


def load_nanogpt(path: Path) -> Checkpoint:
    """A nanoGPT ckpt.pt: validated, tensors memory-mapped, optimizer state left on disk."""
    raw = read_checkpoint_file(path)
    if not isinstance(raw, dict) or "model" not in raw or "model_args" not in raw:
        keys = sorted(repr(k)[:40] for k in raw)[:6] if isinstance(raw, dict) else type(raw).__name__
        raise TpshardError(f"{path}: not a nanoGPT checkpoint (needs 'model' and 'model_args'; found {keys})")
    if not isinstance(raw["model"], dict):
        raise TpshardError(f"{path}: 'model' is not a state_dict")
    config = config_from_model_args(raw["model_args"], path)
    optimizer = raw.get("optimizer")
    return Checkpoint(
        path=path,
        config=config,
        state_dict=clean_state_dict(raw["model"], config, path),
        **training_record(raw, path),
        # merge writes None: nothing to leave out (and a tensor's truth value would raise)
        has_optimizer=optimizer is not None and not (isinstance(optimizer, dict | list) and not optimizer),
    )


def nanogpt_dict(checkpoint: Checkpoint) -> dict:
    """The ckpt.pt layout nanoGPT's train.py writes and sample.py reads (optimizer state not kept)."""
    return _nanogpt_dict(checkpoint, {name: t for name, t in checkpoint.state_dict.items() if name not in TIED})


def _nanogpt_dict(checkpoint: Checkpoint, model: dict) -> dict:
    for tied, source in TIED.items():
        model[tied] = model[source]  # one storage, saved once, as nanoGPT saves it
    return {
        "model": model,
        "optimizer": None,
        "model_args": model_args(checkpoint.config),
        "iter_num": checkpoint.iter_num,
        "best_val_loss": torch.tensor(checkpoint.best_val_loss) if checkpoint.best_val_loss is not None else None,
        "config": checkpoint.train_config,
    }


def save_checkpoint(
    checkpoint: Checkpoint,
    path: Path,
    progress: Progress | None = None,
    *,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """nanoGPT's ckpt.pt, atomically, one tensor at a time: the file torch.save(nanogpt_dict(checkpoint))
    writes, but each tensor taken from checkpoint.state_dict only when its record is written (so a
    merge's tensors are put together one by one), and its pages released after (files/torchzip.py).
    before_rename: atomic_write's, the last check before the file takes its name."""
    tensors = checkpoint.state_dict
    model = {
        name: Deferred(dtype, shape, partial(tensors.__getitem__, name))
        for name, dtype, shape in layout_of(tensors)
        if name not in TIED
    }
    record = _nanogpt_dict(checkpoint, model)
    trim = not in_reused_memory(tensors)
    atomic_write(Path(path), lambda tmp: save_streamed(record, tmp, progress, trim=trim), before_rename)
