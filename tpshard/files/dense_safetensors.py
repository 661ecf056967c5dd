"""A dense safetensors checkpoint, as `tpshard merge --format safetensors` writes it: nanoGPT's names
(lm_head left out, it is wte), model_args and the training record in the metadata."""

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tpshard.errors import TpshardError
from tpshard.files.atomic import atomic_write
from tpshard.files.checkpoint import Checkpoint, clean_state_dict, config_from_model_args, model_args, training_record
from tpshard.parallel.plan import TIED


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
        path=path, config=config, state_dict=clean_state_dict(state, config, path), **training_record(fields, path)
    )
