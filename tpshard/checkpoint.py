"""nanoGPT checkpoints (ckpt.pt as train.py writes it): safe, lazy loading and atomic saving.

Loading never unpickles code (weights_only=True) and memory-maps the file, so the optimizer state,
often twice the model's size, is never read from disk.
"""

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tpshard.errors import TpshardError
from tpshard.model import GPT, GPTConfig, check_divides
from tpshard.plan import TIED, dense_shapes

COMPILE_PREFIX = "_orig_mod."  # left by torch.compile
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
EXTENSIONS = ("activation", "layer_norm_epsilon")  # GPTConfig fields nanoGPT lacks


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
    if not zipfile.is_zipfile(path):
        raise TpshardError(
            f"{path}: not a PyTorch checkpoint (no zip archive: truncated, or saved in the legacy format; "
            "re-save it with torch.save)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise TpshardError(
            f"{path}: refused to unpickle: the file holds more than tensors and plain data ({first[:200]}); "
            "tpshard never runs code from a checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TpshardError(f"{path}: unreadable checkpoint ({first[:200]}); is the file truncated?") from None


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
        name = name.removeprefix(COMPILE_PREFIX)
        if name.endswith(".attn.bias") and not name.endswith("c_attn.bias"):
            continue  # causal mask buffer, present when flash attention was unavailable
        if not isinstance(tensor, torch.Tensor):
            raise TpshardError(f"{path}: model entry {name!r} is not a tensor")
        state[name] = tensor
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
        if not state[name].is_floating_point():
            raise TpshardError(f"{path}: {name} has dtype {state[name].dtype}, expected a float tensor")
    for tied, source in TIED.items():
        shared = state[tied].data_ptr() == state[source].data_ptr() and state[tied].stride() == state[source].stride()
        if not shared and not torch.equal(state[tied], state[source]):
            raise TpshardError(f"{path}: {tied} differs from {source}; tpshard expects them tied as in nanoGPT")
        state[tied] = state[source]
    return state


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
        keys = sorted(raw)[:6] if isinstance(raw, dict) else type(raw).__name__
        raise TpshardError(f"{path}: not a nanoGPT checkpoint (needs 'model' and 'model_args'; found {keys})")
    if not isinstance(raw["model"], dict):
        raise TpshardError(f"{path}: 'model' is not a state_dict")
    config = config_from_model_args(raw["model_args"], path)
    best = raw.get("best_val_loss")
    return Checkpoint(
        path=path,
        config=config,
        state_dict=clean_state_dict(raw["model"], config, path),
        iter_num=raw.get("iter_num"),
        best_val_loss=float(best) if best is not None else None,
        train_config=raw.get("config") or {},
        has_optimizer="optimizer" in raw,
    )


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    except (SafetensorError, json.JSONDecodeError) as e:
        raise TpshardError(f"{path}: unreadable safetensors checkpoint ({e})") from None
    if "model_args" not in fields:
        raise TpshardError(f"{path}: safetensors file without model_args metadata; not written by tpshard merge")
    config = config_from_model_args(fields["model_args"], path)
    return Checkpoint(
        path=path,
        config=config,
        state_dict=clean_state_dict(state, config, path),
        iter_num=fields.get("iter_num"),
        best_val_loss=fields.get("best_val_loss"),
        train_config=fields.get("config") or {},
    )


def check_tp(config: GPTConfig, tp_size: int) -> None:
    try:
        check_divides(config, tp_size)
    except ValueError as e:
        raise TpshardError(str(e)) from None
