"""nanoGPT checkpoints (ckpt.pt as train.py writes it): safe, lazy loading and atomic saving.

Loading never unpickles code (weights_only=True) and memory-maps the file, so the optimizer state,
often twice the model's size, is never read from disk.
"""

import contextlib
import fcntl
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tpshard.errors import TpshardError, first_line
from tpshard.model import GPT, GPTConfig
from tpshard.plan import TIED, dense_shapes

COMPILE_PREFIX = "_orig_mod."  # left by torch.compile
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
EXTENSIONS = ("activation", "layer_norm_epsilon")  # GPTConfig fields nanoGPT lacks
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what safetensors shards hold
MIN_TENSORS_PER_LAYER = 6  # bias=False: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj weights
MAX_PLAIN_ITEMS = 100_000  # values in a checkpoint's training config, counted as written out
ORPHAN_AGE_S = 60  # an unlocked temporary output untouched this long was left by a killed run


@dataclass
class Checkpoint:
    """A dense model: its config, its tensors under nanoGPT's names (lm_head tied to wte) and the
    training bookkeeping that merge writes back."""

    path: Path
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    iter_num: int | None = None
    best_val_loss: float | None = None
    train_config: dict = field(default_factory=dict)
    has_optimizer: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.state_dict["transformer.wte.weight"].dtype

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
        return GPT.from_state_dict(self.config, self.state_dict).to(device=device, dtype=dtype)


def read_checkpoint_file(path: Path) -> dict:
    """torch.load, weights only and memory-mapped, with every failure turned into one clear line."""
    path = Path(path)
    if not path.exists():
        raise TpshardError(f"{path}: no such file")
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


def config_from_model_args(model_args: object, path: Path) -> GPTConfig:
    if not isinstance(model_args, dict):
        raise TpshardError(f"{path}: 'model_args' is not a dict")
    missing = [k for k in MODEL_ARGS if k not in model_args]
    if missing:
        raise TpshardError(f"{path}: 'model_args' lacks {', '.join(missing)}")
    config = GPTConfig(**{k: model_args[k] for k in (*MODEL_ARGS, "dropout", *EXTENSIONS) if k in model_args})
    if config.activation not in ("gelu", "gelu_new"):
        raise TpshardError(f"{path}: activation {config.activation!r} is not supported (gelu or gelu_new)")
    if not isinstance(config.layer_norm_epsilon, float) or not 0 < config.layer_norm_epsilon < 1:
        raise TpshardError(f"{path}: layer_norm_epsilon {config.layer_norm_epsilon!r} is not valid")
    for name in MODEL_ARGS:
        value = getattr(config, name)
        if name == "bias":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not ok:
            raise TpshardError(f"{path}: model_args {name}={value!r} is not valid")
    if config.n_embd % config.n_head:
        raise TpshardError(f"{path}: n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
    config.dropout = 0.0  # inference: dropout off
    return config


def clean_state_dict(raw: dict, config: GPTConfig, path: Path) -> dict[str, torch.Tensor]:
    """nanoGPT's names: strip torch.compile's prefix, drop the causal-mask buffers, tie lm_head to wte,
    and check every shape against model_args."""
    state = {}
    for name, tensor in raw.items():
        if not isinstance(name, str):
            raise TpshardError(f"{path}: model entry {name!r} is not named by a string; is this a nanoGPT checkpoint?")
        name = name.removeprefix(COMPILE_PREFIX)
        if name.endswith(".attn.bias") and not name.endswith("c_attn.bias"):
            continue  # causal mask buffer, present when flash attention was unavailable
        if not isinstance(tensor, torch.Tensor):
            raise TpshardError(f"{path}: model entry {name!r} is not a tensor")
        state[name] = tensor
    if MIN_TENSORS_PER_LAYER * config.n_layer > len(state):  # before dense_shapes builds n_layer entries
        raise TpshardError(
            f"{path}: model_args n_layer={config.n_layer} but the model has only {len(state)} tensors; "
            "is this a nanoGPT checkpoint?"
        )
    expected = dense_shapes(config)
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected and n not in TIED]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise TpshardError(f"{path}: tensors disagree with model_args ({detail}); is this a nanoGPT checkpoint?")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise TpshardError(f"{path}: {name} has shape {tuple(state[name].shape)}, model_args imply {shape}")
        if state[name].dtype not in SUPPORTED_DTYPES or state[name].layout != torch.strided:
            raise TpshardError(
                f"{path}: {name} is a {state[name].dtype} {state[name].layout} tensor, expected a dense float "
                "tensor (float32, float16, bfloat16 or float64)"
            )
        _check_stored(state[name], name, path)
    for tied, source in TIED.items():
        shared = state[tied].data_ptr() == state[source].data_ptr() and state[tied].stride() == state[source].stride()
        if not shared and not torch.equal(state[tied], state[source]):
            raise TpshardError(f"{path}: {tied} differs from {source}; tpshard expects them tied as in nanoGPT")
        state[tied] = state[source]
    return state


def _check_stored(tensor: torch.Tensor, name: str, path: Path) -> None:
    """Every element stored once: an expanded tensor (stride 0) is a few bytes in the file that claim any
    shape at all, and splitting copies it out whole; a forged one could claim terabytes."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > tensor.untyped_storage().nbytes():
        raise TpshardError(
            f"{path}: {name} claims {nbytes:,} bytes but stores {tensor.untyped_storage().nbytes():,} "
            "(an expanded or overlapping tensor); expected plain weights"
        )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a nanoGPT ckpt.pt (or a dense .safetensors written by `tpshard merge --format safetensors`):
    validated, tensors memory-mapped, optimizer state left on disk."""
    from tpshard import hf

    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return load_safetensors_checkpoint(path)
    if hf.is_hf_directory(path):
        return hf.load_hf(path)
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
        **bookkeeping(raw, path),
        # merge writes None: nothing to leave out (and a tensor's truth value would raise)
        has_optimizer=optimizer is not None and not (isinstance(optimizer, dict | list) and not optimizer),
    )


def bookkeeping(fields: dict, path: Path) -> dict:
    """iter_num, best_val_loss and the training config, checked: the manifest keeps them as JSON."""
    return {
        "iter_num": _int_or_none(fields.get("iter_num"), path),
        "best_val_loss": _float_or_none(fields.get("best_val_loss"), path),
        "train_config": plain_config(fields.get("config"), path),
    }


def _int_or_none(value: object, path: Path) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TpshardError(f"{path}: iter_num is a {type(value).__name__}, expected an int")


def _float_or_none(value: object, path: Path) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # estimate_loss() returns a 0-d tensor
        value = value.item()
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TpshardError(f"{path}: best_val_loss is a {type(value).__name__}, expected a number")


def plain_config(config: object, path: Path) -> dict:
    """The training config as plain JSON data. Walked as a tree and bounded: a pickle can reference one
    list from itself many times over, a few bytes that would expand to billions of values as JSON."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TpshardError(f"{path}: 'config' is a {type(config).__name__}, expected a dict of training settings")
    left = MAX_PLAIN_ITEMS
    todo: list[object] = [config]
    while todo:
        value = todo.pop()
        left -= 1
        if left < 0:
            raise TpshardError(f"{path}: 'config' holds more than {MAX_PLAIN_ITEMS:,} values; not training settings")
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TpshardError(f"{path}: 'config' has a key that is not a string")
            todo.extend(value.values())
        elif isinstance(value, list | tuple):
            todo.extend(value)
        elif not (value is None or isinstance(value, str | int | float)):
            raise TpshardError(f"{path}: 'config' holds a {type(value).__name__}; expected plain values")
    return config


def model_args(config: GPTConfig) -> dict:
    """nanoGPT's model_args; the extension fields only where they differ from nanoGPT's behaviour, so
    that nanoGPT's GPTConfig(**model_args) still accepts a nanoGPT model's."""
    args = asdict(config)
    for name in EXTENSIONS:
        if args[name] == getattr(GPTConfig, name):
            del args[name]
    return args


def nanogpt_dict(checkpoint: Checkpoint) -> dict:
    """The ckpt.pt layout nanoGPT's train.py writes and sample.py reads (optimizer state not kept)."""
    state = dict(checkpoint.state_dict)
    for tied, source in TIED.items():
        state[tied] = state[source]  # one storage, saved once, as nanoGPT saves it
    return {
        "model": state,
        "optimizer": None,
        "model_args": model_args(checkpoint.config),
        "iter_num": checkpoint.iter_num,
        "best_val_loss": torch.tensor(checkpoint.best_val_loss) if checkpoint.best_val_loss is not None else None,
        "config": checkpoint.train_config,
    }


def atomic_write(path: Path, write) -> None:
    """Run write(tmp_path), then rename over path: a crash leaves no half-written file under path's name."""
    path = Path(path)
    if path.is_dir():
        raise TpshardError(f"{path}: is a directory, expected a file name for the output")
    remove_orphans(path, ".tmp")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no such directory, read-only, ...
        raise TpshardError(f"{path.parent}: cannot write here ({e.strerror})") from None
    try:
        hold(fd)
        os.fchmod(fd, under_umask(0o666))  # mkstemp's 0600 is for the temporary name only
        write(Path(tmp))
        os.fsync(fd)  # the data on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # a full disk, say: one line, not a traceback (torch.save and safetensors raise their own types)
        if isinstance(e, OSError | RuntimeError | SafetensorError):
            raise TpshardError(f"{path}: writing failed ({write_failure(e)}); {path} is unchanged") from None
        raise
    finally:
        os.close(fd)


def under_umask(mode: int) -> int:
    """mode as the umask leaves it: what a plain open() or mkdir() would have given the output."""
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return mode & ~umask


def hold(fd: int) -> None:
    """Lock a temporary output while this process writes it. The kernel drops the lock when the process
    ends, however it ends (kill -9 included), which is how a later run tells an orphan from a live write."""
    with contextlib.suppress(OSError):  # a file system without locks: orphans stay (no one can lock them)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_orphans(out: Path, suffix: str) -> None:
    """Delete the temporary outputs (.OUT.xxxxxxxx<suffix>, as mkstemp/mkdtemp name them) that killed runs
    left beside out: unlocked and untouched for ORPHAN_AGE_S (a live run locks its own right after creating
    it). Nothing else is touched; a failure to clean is no reason to fail the run."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > ORPHAN_AGE_S:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass  # locked by its writer, or not ours to remove
        finally:
            os.close(fd)


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason, or the first line of torch's or safetensors'."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return f"{first_line(e) or type(e).__name__}; is the disk full?"


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(nanogpt_dict(checkpoint), tmp))


def save_safetensors(checkpoint: Checkpoint, path: Path) -> None:
    """A dense safetensors file: nanoGPT's names (lm_head left out, it is wte), model_args and the
    training bookkeeping in the metadata."""
    state = {k: v.contiguous() for k, v in checkpoint.state_dict.items() if k not in TIED}
    metadata = {
        "format": "pt",
        "model_args": json.dumps(model_args(checkpoint.config)),
        "iter_num": json.dumps(checkpoint.iter_num),
        "best_val_loss": json.dumps(checkpoint.best_val_loss),
        "config": json.dumps(checkpoint.train_config),
    }
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))


def load_safetensors_checkpoint(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
        fields = {k: json.loads(meta[k]) for k in ("model_args", "iter_num", "best_val_loss", "config") if k in meta}
    except (SafetensorError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise TpshardError(f"{path}: unreadable safetensors checkpoint ({str(e)[:200]})") from None
    if "model_args" not in fields:
        raise TpshardError(f"{path}: safetensors file without model_args metadata; not written by tpshard merge")
    config = config_from_model_args(fields["model_args"], path)
    return Checkpoint(
        path=path, config=config, state_dict=clean_state_dict(state, config, path), **bookkeeping(fields, path)
    )
