"""Hugging Face GPT-2 checkpoints in and out (config.json + model.safetensors or pytorch_model.bin).

Converted as nanoGPT's from_pretrained does, with what it glosses over kept: HF's Conv1D stores
weights [in, out] (transposed here), the hub's files have no `transformer.` prefix, the attention
mask buffers are not weights, a missing lm_head means tied to wte, and HF GPT-2 runs the tanh GELU
("gelu_new") with its own layer_norm_epsilon: both go into the config so the model runs as HF's does.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError
from tpshard.files.atomic import atomic_directory
from tpshard.files.checkpoint import Checkpoint, clean_state_dict, config_from_model_args
from tpshard.files.nanogpt import read_checkpoint_file
from tpshard.files.tensorfile import Layout, Progress, TensorSource, in_reused_memory, layout_of, write_safetensors
from tpshard.parallel.plan import TIED

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_CONFIG_BYTES = 1 << 20  # a GPT-2 config.json is about 1 KB


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _config(path: Path) -> GPTConfig:
    file = path / "config.json"
    if file.stat().st_size > MAX_CONFIG_BYTES:  # read whole, so bounded first
        raise TpshardError(f"{file}: {file.stat().st_size:,} bytes, too large for a GPT-2 config.json")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # Recursion: nested too deep
        raise TpshardError(f"{file}: unreadable ({str(e)[:200]})") from None
    if not isinstance(hf, dict):
        raise TpshardError(f"{file}: not a JSON object; expected a GPT-2 config.json")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise TpshardError(f"{path}: model_type {hf.get('model_type')!r} is not GPT-2; tpshard reads GPT-2 only")
    activation = hf.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise TpshardError(f"{path}: activation_function {activation!r} is not supported (gelu_new or gelu)")
    try:
        args = {
            "block_size": int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            "vocab_size": int(hf["vocab_size"]),
            "n_layer": int(hf["n_layer"]),
            "n_head": int(hf["n_head"]),
            "n_embd": int(hf["n_embd"]),
            "bias": True,
            "activation": ACTIVATIONS[activation],
            "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        }
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise TpshardError(f"{file}: missing or invalid GPT-2 field ({e})") from None
    return config_from_model_args(args, file)  # positive sizes, whole heads, a usable epsilon


def _weights_file(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise TpshardError(f"{path}: no {' or '.join(WEIGHT_FILES)} beside config.json")


def _weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".bin":
        state = read_checkpoint_file(file)  # weights only, memory-mapped
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise TpshardError(f"{file}: not a state_dict (a dict of named tensors)")
        return state
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not iterable)
    except SafetensorError as e:
        raise TpshardError(f"{file}: unreadable safetensors file ({e})") from None


def _nanogpt_name(key: str) -> str | None:
    key = key.removeprefix("transformer.")
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # mask buffers in older HF files
    return key if key == "lm_head.weight" else "transformer." + key


def load_hf(path: Path) -> Checkpoint:
    """A Hugging Face GPT-2 directory as a tpshard checkpoint (nanoGPT names, [out, in] weights).
    Its path is the weights file: what split hashes and names as the source."""
    config = _config(path)
    file = _weights_file(path)
    state = {}
    for key, tensor in _weights(file).items():
        name = _nanogpt_name(key)
        if name is None:
            continue
        state[name] = tensor.t() if name.endswith(CONV1D) else tensor
    return Checkpoint(path=file, config=config, state_dict=clean_state_dict(state, config, file))


def hf_config(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "activation_function": config.activation,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }


def hf_tensors(checkpoint: Checkpoint) -> TensorSource:
    """HF GPT-2 names and layouts (lm_head left out: HF ties it to wte), each tensor made from the
    checkpoint's only when asked for (in reused memory where the checkpoint's are); a Conv1D weight
    is a transposed view of it, which the streaming writer (tensorfile.OutputFile.write_tensor) reads
    where it lies, a block of rows at a time, never copied whole."""
    source = checkpoint.state_dict
    layout: Layout = []
    origin: dict[str, tuple[str, bool]] = {}  # HF name -> (nanoGPT name, transposed); zero biases: ("", False)
    for name, dtype, shape in layout_of(source):
        if name in TIED:
            continue
        key, conv = name.removeprefix("transformer."), name.endswith(CONV1D)
        shape = shape[::-1] if conv else shape
        layout.append((key, dtype, shape))
        origin[key] = (name, conv)
        # HF GPT-2 always has biases; zeros compute the same function
        if not checkpoint.config.bias and (conv or ".ln_" in key or key.startswith("ln_f.")):
            bias = key.removesuffix("weight") + "bias"
            layout.append((bias, dtype, shape[-1:]))
            origin[bias] = ("", False)
    kinds = {key: (dtype, shape) for key, dtype, shape in layout}

    def make(key: str) -> torch.Tensor:
        name, conv = origin[key]
        if not name:
            dtype, shape = kinds[key]
            return torch.zeros(shape, dtype=dtype)
        tensor = source[name]
        return tensor.t() if conv else tensor  # a view: the writer copies it out a block at a time

    return TensorSource(layout, make, reused=in_reused_memory(source))


def hf_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """HF GPT-2 names and layouts (lm_head left out: HF ties it to wte), every tensor in memory, contiguous."""
    return {key: tensor.contiguous() for key, tensor in hf_tensors(checkpoint).items()}


def save_hf(
    checkpoint: Checkpoint,
    out_dir: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads, the
    weights written one tensor at a time (hf_tensors). before_rename: atomic_directory's, the last
    check before the directory takes its name."""
    tensors = hf_tensors(checkpoint)
    dtype = next(dtype for _, dtype, _ in tensors.layout)
    config = hf_config(checkpoint.config) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    with atomic_directory(Path(out_dir), force, before_rename) as tmp:
        weights = tmp / "model.safetensors"
        metadata, trim = {"format": "pt"}, not tensors.reused
        write_safetensors(weights, tensors.layout, tensors.__getitem__, metadata, progress, sha256=False, trim=trim)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
