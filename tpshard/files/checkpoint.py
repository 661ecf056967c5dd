"""The dense checkpoint as tpshard holds it, whatever file it came from: its config, its tensors under
nanoGPT's names (lm_head tied to wte) and the training record that merge writes back; and the checks
every reader applies to what a file claims."""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError
from tpshard.files.tensorfile import DTYPE_NAMES, TensorSource
from tpshard.parallel.plan import TIED, dense_shapes

COMPILE_PREFIX = "_orig_mod."  # left by torch.compile
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
EXTENSIONS = ("activation", "layer_norm_epsilon")  # GPTConfig fields nanoGPT lacks
SUPPORTED_DTYPES = tuple(DTYPE_NAMES)  # what safetensors shards hold
MIN_TENSORS_PER_LAYER = 6  # bias=False: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj weights
MAX_PLAIN_ITEMS = 100_000  # values in a checkpoint's training config, counted as written out


@dataclass
class Checkpoint:
    """A dense model: its config, its tensors under nanoGPT's names (lm_head tied to wte) and the
    training record that merge writes back."""

    path: Path
    config: GPTConfig
    state_dict: Mapping[str, torch.Tensor]  # a dict; a merge's is a TensorSource, made one tensor at a time
    iter_num: int | None = None
    best_val_loss: float | None = None
    train_config: dict = field(default_factory=dict)
    has_optimizer: bool = False

    @property
    def dtype(self) -> torch.dtype:
        wte = "transformer.wte.weight"
        if isinstance(self.state_dict, TensorSource):  # from its layout: making a tensor may reuse a writer's memory
            return next(dtype for name, dtype, _ in self.state_dict.layout if name == wte)
        return self.state_dict[wte].dtype


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
    _check_one_dtype(state, expected, path)
    for tied, source in TIED.items():
        shared = state[tied].data_ptr() == state[source].data_ptr() and state[tied].stride() == state[source].stride()
        if not shared and not torch.equal(state[tied], state[source]):
            raise TpshardError(f"{path}: {tied} differs from {source}; tpshard expects them tied as in nanoGPT")
        state[tied] = state[source]
    return state


def _check_one_dtype(state: dict[str, torch.Tensor], names: dict, path: Path) -> None:
    """One dtype throughout, as nanoGPT saves (float32, whatever the training precision): a shard set
    records one dtype, and a model runs in one. Casting the odd tensors would change the weights silently."""
    first = next(iter(names))
    other = next((n for n in names if state[n].dtype != state[first].dtype), None)
    if other is not None:
        dtypes = sorted({DTYPE_NAMES[state[n].dtype] for n in names})
        raise TpshardError(
            f"{path}: mixed dtypes ({', '.join(dtypes)}): {first} is {DTYPE_NAMES[state[first].dtype]} but "
            f"{other} is {DTYPE_NAMES[state[other].dtype]}; tpshard expects one dtype throughout (re-save the "
            "model in one dtype, e.g. after model.float())"
        )


def _check_stored(tensor: torch.Tensor, name: str, path: Path) -> None:
    """Every element stored once: an expanded tensor (stride 0) is a few bytes in the file that claim any
    shape at all, and splitting copies it out whole; a forged one could claim terabytes."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > tensor.untyped_storage().nbytes():
        raise TpshardError(
            f"{path}: {name} claims {nbytes:,} bytes but stores {tensor.untyped_storage().nbytes():,} "
            "(an expanded or overlapping tensor); expected plain weights"
        )


def training_record(fields: dict, path: Path) -> dict:
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
            if not all(map(is_text, value)):
                raise TpshardError(f"{path}: 'config' has a key with a lone surrogate, not text")
            todo.extend(value.values())
        elif isinstance(value, list | tuple):
            todo.extend(value)
        elif isinstance(value, str):
            if not is_text(value):  # the manifest keeps the config as JSON text, which cannot hold it
                raise TpshardError(f"{path}: 'config' holds a string with a lone surrogate, not text: {value[:60]!r}")
        elif not (value is None or isinstance(value, int | float)):
            raise TpshardError(f"{path}: 'config' holds a {type(value).__name__}; expected plain values")
    return config


def is_text(value: str) -> bool:
    """Whether value can be written as UTF-8: a lone surrogate (from JSON's "\\ud800", a pickle, a file name
    that is not UTF-8) cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def model_args(config: GPTConfig) -> dict:
    """nanoGPT's model_args; the extension fields only where they differ from nanoGPT's behaviour, so
    that nanoGPT's GPTConfig(**model_args) still accepts a nanoGPT model's."""
    args = asdict(config)
    for name in EXTENSIONS:
        if args[name] == getattr(GPTConfig, name):
            del args[name]
    return args
