"""PyTorch Distributed Checkpoint (DCP) directories in and out: `.metadata` plus `__R_I.distcp` data files,
as torch.distributed.checkpoint writes them, and a `tpshard.json` beside them for what DCP has no room for.

Out (`tpshard merge --format dcp`): nanoGPT's names, one process, no process group. The fused attention
projection is written as q, k, v stacked: `attn.c_attn.weight` (3, C, C) and `attn.c_attn.bias` (3, C), the
same bytes as nanoGPT's (3C, C) in the same order. That is the one layout that DCP can reshard onto a
tensor-parallel model: a DTensor sharded on dim 1 of (3, C, C) gives rank r its own heads' q, k and v,
whereas a (3C, C) tensor can only be cut in contiguous blocks of rows (for 2 ranks: rank 0 would get all
of q and half of k). A plain nanoGPT model loads it through (3, C, C) views of its own parameters. lm_head
is written too (the same bytes as wte), so that `dcp.load(model.state_dict())` finds every key.

In (every command that takes a checkpoint): tpshard's own export, or one that torch wrote from any number
of processes (DTensor or plain tensors; c_attn fused or stacked; under nanoGPT's names, optionally
prefixed, e.g. `model.` from `dcp.save({"model": model.state_dict(), ...})`). model_args come from
`tpshard.json`; all but n_head can be read off the tensor shapes, so `{"model_args": {"n_head": 12}}` is
enough for one torch wrote.

Safety: torch 2.13 reads `.metadata` with plain `pickle.load`, which runs whatever the file names. It is
read here with an unpickler that resolves only DCP's own metadata classes, torch.Size, dtypes and paths,
and is checked field by field before anything is trusted; data files are named by plain file names in
the directory, each piece must be an uncompressed torch.save archive, and only tensor entries are read
(DCP unpickles non-tensor entries with weights_only=False: tpshard never asks for one).
"""

import io
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError, first_line
from tpshard.files.atomic import atomic_directory, file_status, write_failure
from tpshard.files.checkpoint import (
    COMPILE_PREFIX,
    MODEL_ARGS,
    SUPPORTED_DTYPES,
    Checkpoint,
    clean_state_dict,
    config_from_model_args,
    model_args,
    plain_config,
    training_record,
)
from tpshard.files.pages import drop_file_pages
from tpshard.files.tensorfile import OutputFile, Progress, one_thread
from tpshard.parallel.plan import EMBEDDING, TIED, dense_shapes

METADATA = ".metadata"
SIDECAR = "tpshard.json"
FORMAT = "tpshard-dcp"
FORMAT_VERSION = 1
STACKED = "stacked"  # c_attn as (3, C, C): what tpshard writes
FUSED = "fused"  # c_attn as nanoGPT's (3C, C): what a nanoGPT model saved by torch holds
MAX_METADATA_BYTES = 64 << 20  # a GPT-2's is a few KB; one of a 70B model sharded 1,000 ways a few MB
MAX_SIDECAR_BYTES = 16 << 20
MAX_CHUNKS = 1024  # pieces per tensor (one per rank that saved a slice of it), checked pairwise for overlap
C_ATTN = (".attn.c_attn.weight", ".attn.c_attn.bias")
SINGLE_PROCESS_WARNING = "torch.distributed is disabled"  # dcp.save/load warn even with no_dist=True
DATA_NAME = re.compile(r"[^/\\\x00]+")  # a data file: a plain name in the checkpoint's directory

# What .metadata may refer to (module -> names), checked before the unpickler looks anything up.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name, e.g. "torch.strided"
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "torch": {"Size"},  # and the dtypes: see find_class
}


def is_dcp_directory(path: Path) -> bool:
    """A directory with a `.metadata` file (a broken link too: reading it says what is wrong)."""
    metadata = Path(path) / METADATA
    return Path(path).is_dir() and (metadata.is_file() or metadata.is_symlink())


# --- .metadata, read without running code ---------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """A reference to anything but DCP's metadata classes (a damaged pickle raises UnpicklingError itself)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        allowed = _METADATA_CLASSES.get(module, set())
        if module == "torch" and name not in allowed:
            import torch as torch_module

            value = getattr(torch_module, name, None)
            if isinstance(value, torch.dtype):
                return value
        elif name in allowed:
            return super().find_class(module, name)
        raise _Refused(f"refers to {module}.{name}"[:120])

    def persistent_load(self, pid: object) -> object:
        raise _Refused("holds a persistent reference")


def read_metadata(directory: Path) -> object:
    """The DCP Metadata of a directory, unpickled safely and checked in its shape: a dict of entries,
    tensor ones with properties, size and chunks, and the storage table. What the entries claim (shapes,
    offsets) is checked later, against the model, for the tensors read."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / METADATA
    size, problem = file_status(path)
    if problem:
        raise TpshardError(f"{path}: is {problem}; a DCP checkpoint needs its .metadata file")
    if size == 0:
        raise TpshardError(f"{path}: file is empty; is the DCP checkpoint incomplete?")
    if size > MAX_METADATA_BYTES:
        raise TpshardError(f"{path}: {size:,} bytes, too large for DCP metadata (at most {MAX_METADATA_BYTES:,})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TpshardError(f"{path}: cannot read ({e.strerror})") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise TpshardError(
            f"{path}: refused to unpickle: {first_line(e)} (DCP metadata holds torch.distributed.checkpoint's "
            "own classes only); tpshard never runs code from a checkpoint"
        ) from None
    except Exception as e:  # a damaged pickle fails in many ways: EOFError, TypeError, KeyError, RecursionError...
        raise TpshardError(
            f"{path}: unreadable DCP metadata ({type(e).__name__}: {first_line(e)}); is it damaged or truncated?"
        ) from None
    if not isinstance(metadata, Metadata):
        raise TpshardError(
            f"{path}: holds an object of type {type(metadata).__name__}, not DCP Metadata; is it damaged?"
        )
    _check_metadata_shape(metadata, path)
    return metadata


def _check_metadata_shape(metadata: object, path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise TpshardError(f"{path}: DCP metadata without its entry or storage table; is it damaged?")
    for name, entry in entries.items():
        if not isinstance(name, str) or not isinstance(entry, TensorStorageMetadata | BytesStorageMetadata):
            raise TpshardError(f"{path}: DCP metadata entry {str(name)[:60]!r} is malformed; is it damaged?")


def _tensor_entries(metadata: object) -> dict[str, object]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {n: e for n, e in metadata.state_dict_metadata.items() if isinstance(e, TensorStorageMetadata)}


def _dims(value: object) -> tuple[int, ...] | None:
    """A torch.Size of non-negative ints as a tuple; None for anything else."""
    if not isinstance(value, torch.Size) or not all(type(d) is int and d >= 0 for d in value):
        return None
    return tuple(value)


# --- reading ----------------------------------------------------------------------------------------


@dataclass
class _Selected:
    """The checkpoint's tensors that make up the model: nanoGPT name -> the entry's name in the DCP."""

    names: dict[str, str]
    prefix: str
    others: list[str] = field(default_factory=list)  # entries left unread (optimizer state, ...)


def load_dcp(directory: str | Path) -> Checkpoint:
    """A DCP directory as a dense Checkpoint (tensors read whole into memory, in one process). Its path is
    the .metadata file: what split hashes and names as the source."""
    directory = Path(directory)
    sidecar = _read_sidecar(directory)
    metadata = read_metadata(directory)
    tensors = _tensor_entries(metadata)
    selected = _select(tensors, metadata.state_dict_metadata, sidecar, directory)
    config = _config(sidecar, {name: _dims(tensors[fqn].size) for name, fqn in selected.names.items()}, directory)
    targets = _targets(tensors, selected, config, metadata, directory)
    _read_into(targets, selected.names, metadata, directory)
    expected = dense_shapes(config)
    state = {name: tensor.view(expected.get(name) or expected[TIED[name]]) for name, tensor in targets.items()}
    return Checkpoint(
        path=directory / METADATA,
        config=config,
        state_dict=clean_state_dict(state, config, directory),
        **training_record(sidecar, directory),
        has_optimizer=bool(selected.others),
    )


def _read_sidecar(directory: Path) -> dict:
    path = directory / SIDECAR
    size, problem = file_status(path)
    if problem == "missing":
        return {}
    if problem:
        raise TpshardError(f"{path}: is {problem}; it should hold the model_args as JSON")
    if size > MAX_SIDECAR_BYTES:
        raise TpshardError(f"{path}: {size:,} bytes, too large for model_args and a training record")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TpshardError(f"{path}: unreadable ({first_line(e)}); it should be a JSON object") from None
    if not isinstance(data, dict):
        raise TpshardError(f'{path}: not a JSON object; expected {{"model_args": {{...}}}}')
    if "format_version" in data and data["format_version"] != FORMAT_VERSION:
        raise TpshardError(
            f"{path}: format_version {data['format_version']!r}, this tpshard reads {FORMAT_VERSION}; "
            "use a matching tpshard or export again"
        )
    if "prefix" in data and not isinstance(data["prefix"], str):
        raise TpshardError(f"{path}: 'prefix' is not a string")
    return data


def _select(tensors: dict, entries: dict, sidecar: dict, directory: Path) -> _Selected:
    """Which entries are the model: those under the prefix before nanoGPT's names (torch.compile's
    `_orig_mod.` taken off), the causal-mask buffers left out."""
    if "prefix" in sidecar:
        prefix = sidecar["prefix"]
    else:
        prefixes = sorted({name[: -len(EMBEDDING)] for name in tensors if name.endswith(EMBEDDING)})
        if not prefixes:
            found = ", ".join(sorted(entries)[:4]) or "none"
            raise TpshardError(
                f"{directory}: no {EMBEDDING} among the DCP checkpoint's tensors (found {found}); tpshard reads "
                "nanoGPT's names"
            )
        if len(prefixes) > 1:
            raise TpshardError(
                f"{directory}: several models in one DCP checkpoint (under {', '.join(map(repr, prefixes))}); "
                f'say which in {directory / SIDECAR}: {{"prefix": "..."}}'
            )
        prefix = prefixes[0]
    names, others = {}, []
    for fqn in entries:
        if fqn not in tensors or not fqn.startswith(prefix):
            others.append(fqn)
            continue
        name = fqn[len(prefix) :].removeprefix(COMPILE_PREFIX)
        if name.endswith(".attn.bias"):  # nanoGPT's causal mask, present when flash attention was unavailable
            continue
        names[name] = fqn
    if EMBEDDING not in names:
        raise TpshardError(f"{directory}: no {prefix}{EMBEDDING} among the DCP checkpoint's tensors")
    return _Selected(names, prefix, others)


def _config(sidecar: dict, shapes: dict[str, tuple[int, ...] | None], directory: Path) -> GPTConfig:
    """model_args: the sidecar's, the sizes it leaves out read off the shapes; n_head cannot be."""
    path = directory / SIDECAR
    given = sidecar.get("model_args", {})
    if not isinstance(given, dict):
        raise TpshardError(f"{path}: 'model_args' is not a JSON object")
    if "n_head" not in given:
        raise TpshardError(
            f"{directory}: a DCP checkpoint without model_args (n_head cannot be read off the shapes); add "
            f'{path} holding {{"model_args": {{"n_head": N}}}}'
        )
    wte, wpe = shapes.get(EMBEDDING), shapes.get("transformer.wpe.weight")
    layers = {int(m[1]) for name in shapes if (m := re.match(r"transformer\.h\.(\d+)\.", name))}
    inferred: dict[str, object] = {"bias": "transformer.ln_f.bias" in shapes, "n_layer": max(layers, default=-1) + 1}
    if wte is not None and len(wte) == 2:
        inferred |= {"vocab_size": wte[0], "n_embd": wte[1]}
    if wpe is not None and len(wpe) == 2:
        inferred["block_size"] = wpe[0]
    args = {k: v for k, v in inferred.items() if k in MODEL_ARGS} | given
    return config_from_model_args(args, path)  # the sidecar is where a wrong value is mended


def _stacked(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (3, shape[0] // 3, *shape[1:])


def _targets(tensors: dict, selected: _Selected, config: GPTConfig, metadata: object, directory: Path) -> dict:
    """An empty tensor for every model tensor, of the stored size and dtype, once every claim about it
    (names, shapes, dtype, pieces, where the pieces are) is checked: nothing is allocated before."""
    expected = dense_shapes(config)
    missing = [n for n in expected if n not in selected.names]
    unexpected = [n for n in selected.names if n not in expected and n not in TIED]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise TpshardError(f"{directory}: tensors disagree with model_args ({detail}); is this a nanoGPT checkpoint?")
    targets = {}
    sizes = _file_sizes(metadata, directory)
    for name, fqn in selected.names.items():
        entry = tensors[fqn]
        shape, stored = expected.get(name) or expected[TIED[name]], _dims(entry.size)
        if stored != shape and not (name.endswith(C_ATTN) and stored == _stacked(shape)):
            raise TpshardError(f"{directory}: {fqn} has shape {stored}, model_args imply {shape}")
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        if dtype not in SUPPORTED_DTYPES:
            raise TpshardError(
                f"{directory}: {fqn} is stored as {dtype}, expected a float tensor (float32, float16, bfloat16 "
                "or float64)"
            )
        _check_pieces(fqn, entry, stored, dtype, metadata, sizes, directory)
        targets[name] = torch.empty(stored, dtype=dtype)
    return targets


def _file_sizes(metadata: object, directory: Path) -> dict[str, int | None]:
    """Every data file the storage table names, and its size (None: not a readable file)."""
    sizes: dict[str, int | None] = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if isinstance(name, str) and name not in sizes and DATA_NAME.fullmatch(name) and name not in (".", ".."):
            sizes[name] = file_status(directory / name)[0]
    return sizes


def _check_pieces(
    fqn: str, entry: object, shape: tuple[int, ...], dtype: torch.dtype, metadata: object, sizes: dict, directory: Path
) -> None:
    """The pieces of one tensor tile it exactly (inside it, no overlap, nothing left out), and each is an
    uncompressed range of a data file in the directory, large enough for its elements."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    chunks = getattr(entry, "chunks", None)
    if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_CHUNKS:
        raise TpshardError(f"{directory}/{METADATA}: {fqn} has no valid list of pieces; is it damaged?")
    boxes, covered = [], 0
    for chunk in chunks:
        offsets = _dims(getattr(chunk, "offsets", None)) if isinstance(chunk, ChunkStorageMetadata) else None
        lengths = _dims(getattr(chunk, "sizes", None)) if isinstance(chunk, ChunkStorageMetadata) else None
        if (
            offsets is None
            or lengths is None
            or not len(offsets) == len(lengths) == len(shape)
            or any(o + n > d for o, n, d in zip(offsets, lengths, shape, strict=True))
        ):
            raise TpshardError(
                f"{directory}/{METADATA}: a piece of {fqn} lies outside its shape {shape}; is it damaged?"
            )
        numel = int(torch.Size(lengths).numel())
        if numel == 0:  # a rank that held none of it: nothing to read
            continue
        boxes.append((offsets, lengths))
        covered += numel
        info = metadata.storage_data.get(MetadataIndex(fqn, torch.Size(offsets)))
        _check_storage(fqn, info, numel * dtype.itemsize, sizes, directory)
    overlap = any(
        all(a < c + m and c < a + n for a, n, c, m in zip(*boxes[i], *boxes[j], strict=True))
        for i in range(len(boxes))
        for j in range(i)
    )
    if overlap or covered != int(torch.Size(shape).numel()):
        raise TpshardError(f"{directory}/{METADATA}: the pieces of {fqn} do not cover it exactly once; is it damaged?")


def _check_storage(fqn: str, info: object, nbytes: int, sizes: dict, directory: Path) -> None:
    name = getattr(info, "relative_path", None)
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    if not isinstance(name, str) or name not in sizes:
        raise TpshardError(
            f"{directory}/{METADATA}: a piece of {fqn} is stored in {str(name)[:80]!r}, not a file name in the "
            "checkpoint's directory; is it damaged?"
        )
    if sizes[name] is None:
        _, problem = file_status(directory / name)
        raise TpshardError(f"{directory / name}: is {problem}; the DCP checkpoint is incomplete")
    if type(offset) is not int or type(length) is not int or offset < 0 or length < nbytes:
        raise TpshardError(f"{directory}/{METADATA}: the storage of a piece of {fqn} is malformed; is it damaged?")
    if offset + length > sizes[name]:
        raise TpshardError(
            f"{directory / name}: {sizes[name]:,} bytes, but a piece of {fqn} ends at byte {offset + length:,}; "
            "is the file truncated?"
        )
    if getattr(info, "transform_descriptors", None):
        raise TpshardError(
            f"{directory / name}: a piece of {fqn} is stored transformed ({info.transform_descriptors!r:.60}, "
            "e.g. compressed); tpshard reads plain DCP data only"
        )
    _check_uncompressed(directory / name, offset, length, fqn)


class _FileRange(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a seekable file of their own (for zipfile)."""

    def __init__(self, f: io.BufferedReader, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence])
        return self.pos

    def readinto(self, buffer: memoryview) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _check_uncompressed(path: Path, offset: int, length: int, fqn: str) -> None:
    """A piece is a torch.save archive, which stores every record as is: a compressed one would be
    inflated whole into memory (a few bytes can claim gigabytes)."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(_FileRange(f, offset, length)) as archive:
            packed = [i for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except Exception as e:  # zipfile's many ways of failing: BadZipFile, EOFError, ValueError...
        raise TpshardError(
            f"{path}: the piece of {fqn} at byte {offset:,} is not a torch.save archive ({first_line(e, 100)}); "
            "is the file damaged?"
        ) from None
    if packed:
        raise TpshardError(
            f"{path}: the piece of {fqn} at byte {offset:,} is compressed, which DCP never writes; refused unread"
        )


def checked_reader(directory: str | Path, metadata: object = None) -> object:
    """torch's own FileSystemReader, with .metadata read by read_metadata above (or the metadata given,
    read already) instead of by plain pickle: the storage_reader of a dcp.load, on any number of ranks."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: object, **kwargs: object) -> object:
            checked = metadata if metadata is not None else read_metadata(Path(directory))
            if getattr(checked, "storage_meta", None) is None:
                checked.storage_meta = StorageMeta()
            checked.storage_meta.load_id = self.load_id
            return checked

    return CheckedReader(directory)


def _read_into(targets: dict[str, torch.Tensor], names: dict[str, str], metadata: object, directory: Path) -> None:
    """dcp.load in this process alone (no process group), into targets under the DCP's own names."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    state = {names[name]: tensor for name, tensor in targets.items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", SINGLE_PROCESS_WARNING)
            load(state, storage_reader=checked_reader(directory, metadata), planner=DefaultLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # a BaseException, wrapping each rank's (torch.load's refusal)
        raise TpshardError(f"{directory}: reading the DCP data failed ({_cause(e)}); is a data file damaged?") from None


def _inner(e: BaseException) -> BaseException:
    """The exception behind torch's CheckpointException (which maps each rank to its own), or e."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return inner
    return e


def _cause(e: BaseException) -> str:
    inner = _inner(e)
    return f"{type(inner).__name__}: {first_line(inner, 160)}"


# --- writing ----------------------------------------------------------------------------------------


# A tensor as DCP stores it: its shape and the boxes it is written as, each (offsets, a tensor of that box)
Boxes = dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]]


def _box_planner(boxes: Boxes, progress: Progress | None = None) -> object:
    """torch's default save planner, given the write items of the boxes instead of a state_dict's: it
    writes each box as a chunk of its tensor at its offsets, and hands the writer one box at a time.
    DCP's own planning would need every tensor whole, in memory. The writer keeps what it was handed
    until the data file is closed: boxes that are views of memory-mapped files cost no memory, and
    their pages are dropped as soon as the next box is asked for (written); progress gets its bytes
    then."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class BoxPlanner(DefaultSavePlanner):
        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False)
            self.by_index: dict[tuple[str, torch.Size], torch.Tensor] = {}
            self.last: torch.Tensor | None = None

        def create_local_plan(self) -> SavePlan:
            items = []
            for fqn, (shape, parts) in boxes.items():
                kind = WriteItemType.TENSOR if len(parts) == 1 else WriteItemType.SHARD
                for offsets, box in parts:
                    at = torch.Size(offsets)
                    self.by_index[(fqn, at)] = box
                    chunk = ChunkStorageMetadata(offsets=at, sizes=box.size())
                    data = TensorWriteData(chunk, TensorProperties.create_from_tensor(box), torch.Size(shape))
                    items.append(WriteItem(index=MetadataIndex(fqn, at), type=kind, tensor_data=data))
            self.plan = SavePlan(items)
            return self.plan

        def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
            self.written()
            self.last = self.by_index[(index.fqn, index.offset)]
            return self.last

        def written(self) -> None:
            """The last box handed out is written: a mapped box's pages are done with."""
            if self.last is not None:
                drop_file_pages(self.last)
                if progress:
                    progress(self.last.numel() * self.last.element_size())
            self.last = None

    return BoxPlanner()


def export_state_dict(checkpoint: Checkpoint, qkv: str = STACKED) -> dict[str, torch.Tensor]:
    """The tensors of a DCP export under nanoGPT's names, lm_head included (it is wte's bytes); with
    qkv="stacked" c_attn as (3, C, C) and (3, C) views of nanoGPT's fused tensors."""
    state = {}
    for name, tensor in checkpoint.state_dict.items():
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # torch.save, which DCP calls per tensor, writes whole storages
        state[name] = tensor.view(_stacked(tuple(tensor.shape))) if qkv == STACKED and name.endswith(C_ATTN) else tensor
    for tied, source in TIED.items():
        state[tied] = state[source]
    return state


def stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape tpshard's export stores a nanoGPT tensor in: c_attn's q, k, v stacked."""
    return _stacked(shape) if name.endswith(C_ATTN) else shape


def sidecar(checkpoint: Checkpoint, qkv: str = STACKED) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_args": model_args(checkpoint.config),
        "c_attn": {
            STACKED: "q, k, v stacked: weight (3, n_embd, n_embd), bias (3, n_embd); view as (3 * n_embd, ...) "
            "for nanoGPT",
            FUSED: "nanoGPT's fused (3 * n_embd, n_embd)",
        }[qkv],
        "iter_num": checkpoint.iter_num,
        "best_val_loss": checkpoint.best_val_loss,
        "config": plain_config(checkpoint.train_config, checkpoint.path),
    }


def save_dcp(
    checkpoint: Checkpoint,
    out_dir: Path,
    *,
    force: bool = False,
    tokenizer_file: Path | None = None,
    qkv: str = STACKED,
    boxes: Boxes | None = None,
    progress: Progress | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """A DCP directory written by this one process (no process group): .metadata, one data file,
    tpshard.json and the tokenizer, if any; all or nothing. boxes: the tensors as the boxes to store
    them in (a shard set's memory-mapped pieces: convert.dcp_boxes, stacked q, k, v), written one at a
    time, nothing copied; by default checkpoint's tensors, each whole (export_state_dict). progress:
    the bytes of the boxes written. before_rename: atomic_directory's, the last check before the
    directory takes its name."""
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    out_dir = Path(out_dir)
    if boxes is None:
        state = export_state_dict(checkpoint, qkv)
        boxes = {name: (tuple(t.shape), [((0,) * t.dim(), t)]) for name, t in state.items()}
    record = sidecar(checkpoint, qkv)
    total = sum(box.numel() * box.element_size() for _, parts in boxes.values() for _, box in parts)

    class OutputFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[object]:
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            data = Path(path).suffix == ".distcp"  # the one data file: every box (else .metadata)
            with OutputFile(Path(path), size=total if data else 0) as stream:  # torch.save's records
                yield stream

    class Writer(FileSystemWriter):
        def __init__(self, path: Path):
            super().__init__(path)
            self.fs = OutputFileSystem()

        def storage_meta(self) -> StorageMeta:  # the output's name, not the temporary's it is written under
            return StorageMeta(checkpoint_id=str(out_dir), save_id=self.save_id)

    with atomic_directory(out_dir, force, before_rename) as tmp:
        try:
            with warnings.catch_warnings(), one_thread():  # torch's copies into the OutputFile: see one_thread
                warnings.filterwarnings("ignore", SINGLE_PROCESS_WARNING)
                planner = _box_planner(boxes, progress)
                save({}, storage_writer=Writer(tmp), planner=planner, no_dist=True)
                planner.written()
        except (Exception, CheckpointException) as e:  # the latter a BaseException, wrapping a full disk's OSError
            raise TpshardError(
                f"{out_dir}: writing failed ({write_failure(_inner(e))}); {out_dir} is unchanged"
            ) from None
        (tmp / SIDECAR).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if tokenizer_file is not None and Path(tokenizer_file).is_file():  # missing (a damaged set): left out
            shutil.copyfile(tokenizer_file, tmp / Path(tokenizer_file).name)
