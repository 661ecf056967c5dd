"""A dense safetensors checkpoint, as `tpshard merge --format safetensors` writes it: nanoGPT's names
(lm_head left out, it is wte), model_args and the training record in the metadata."""

import json
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open

from tpshard.errors import TpshardError
from tpshard.files.atomic import atomic_write
from tpshard.files.checkpoint import Checkpoint, clean_state_dict, config_from_model_args, model_args, training_record
from tpshard.files.tensorfile import Progress, in_reused_memory, layout_of, write_safetensors
from tpshard.parallel.plan import TIED


def save_safetensors(
    checkpoint: Checkpoint,
    path: Path,
    progress: Progress | None = None,
    *,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """A dense safetensors file: nanoGPT's names (lm_head left out, it is wte), model_args and the
    training bookkeeping in the metadata. Written one tensor at a time, each taken from
    checkpoint.state_dict only when its turn comes (a merge's tensors are put together one by one).
    before_rename: atomic_write's, the last check before the file takes its name."""
    tensors = checkpoint.state_dict
    layout = [(name, dtype, shape) for name, dtype, shape in layout_of(tensors) if name not in TIED]
    metadata = {
        "format": "pt",
        "model_args": json.dumps(model_args(checkpoint.config)),
        "iter_num": json.dumps(checkpoint.iter_num),
        "best_val_loss": json.dumps(checkpoint.best_val_loss),
        "config": json.dumps(checkpoint.train_config),
    }

    def write(tmp: Path) -> None:
        trim = not in_reused_memory(tensors)
        write_safetensors(tmp, layout, tensors.__getitem__, metadata, progress, sha256=False, trim=trim)

    atomic_write(Path(path), write, before_rename)


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
