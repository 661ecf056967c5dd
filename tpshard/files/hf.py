"""Hugging Face GPT-2 checkpoints in and out (config.json + model.safetensors or pytorch_model.bin).

Converted as nanoGPT's from_pretrained does, with what it glosses over kept: HF's Conv1D stores
weights [in, out] (transposed here), the hub's files have no `transformer.` prefix, the attention
mask buffers are not weights, a missing lm_head means tied to wte, and HF GPT-2 runs the tanh GELU
("gelu_new") with its own layer_norm_epsilon: both go into the config so the model runs as HF's does.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError
from tpshard.files.atomic import atomic_directory
from tpshard.files.checkpoint import Checkpoint, clean_state_dict, config_from_model_args
from tpshard.files.nanogpt import read_checkpoint_file
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


def hf_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """HF GPT-2 names and layouts (lm_head left out: HF ties it to wte)."""
    state = {}
    for name, tensor in checkpoint.state_dict.items():
        if name not in TIED:
            state[name.removeprefix("transformer.")] = (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
    if not checkpoint.config.bias:  # HF GPT-2 always has biases; zeros compute the same function
        for key in list(state):
            if key.endswith(CONV1D) or ".ln_" in key or key.startswith("ln_f."):
                weight = state[key]
                state[key.removesuffix("weight") + "bias"] = weight.new_zeros(weight.shape[-1])
    return state


def save_hf(checkpoint: Checkpoint, out_dir: Path, *, force: bool = False) -> None:
    """config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads."""
    state = hf_state_dict(checkpoint)
    config = hf_config(checkpoint.config) | {"torch_dtype": str(checkpoint.dtype).removeprefix("torch.")}
    with atomic_directory(Path(out_dir), force) as tmp:
        save_file(state, os.fspath(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
