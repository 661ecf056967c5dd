"""torch.save's archive written one tensor at a time, so that saving a model holds a tensor or two, not
the model: `save_streamed(obj, path)` writes, byte for byte, the file torch.save(obj, f) writes to an
open file f, where obj's tensors may be `Deferred`: known by dtype and shape, made as their record
comes up.

torch.save pickles obj first, each tensor's storage a reference ("persistent id") to a record, then
writes every record from memory: the whole model must exist before the first byte is written. Here
the pickle is made from dtypes and shapes alone (a pickler whose `reducer_override` gives each tensor
the reduction torch's own Tensor.__reduce_ex__ gives a plain CPU tensor: `_rebuild_tensor_v2` over a
storage reference numbered in the order met), and the records go through PyTorch's own zip writer
(`torch._C.PyTorchFileWriter`, opened by torch.serialization as torch.save opens it: 64-byte aligned
records, CRC-32 computed, zip64 past 4 GB), one `write_record` per tensor, in torch.save's order:
data.pkl, .format_version, .storage_alignment, byteorder, data/0, data/1, ...; the writer itself ends
with version and .data/serialization_id. Hand-written zip code would have to match all of that;
torch.serialization's internals used here are the ones torch.save calls. tests/test_bounded_memory.py
holds the file to torch.save's.

The file is opened here and handed to the writer, as torch.save does with a file object: the archive's
folder is then "archive" (given a path, PyTorch's writer names it after the file, here the temporary
name an atomic write gives it). One difference, by design: every tensor is its own storage of exactly
its bytes (torch.save writes a view's whole underlying storage). Tensors that are one Python object
(nanoGPT's tied wte and lm_head) are one record, as torch.save makes them.
"""

import io
import math
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tpshard.files.pages import drop_file_pages, trim_free_memory
from tpshard.files.tensorfile import OutputFile, Progress, made_ahead, one_thread

_STORAGE_TYPES = torch.storage._dtype_to_storage_type_map()  # torch.float32 -> "FloatStorage", ...


@dataclass(eq=False)
class Deferred:
    """A tensor of the archive known by its dtype and shape, made (by make()) when its record is written."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


@dataclass(eq=False)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class _Pickler(pickle.Pickler):
    """torch.save's pickle of obj, made from each tensor's dtype and shape: the records to write, in
    order, are collected in `records`."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=torch.serialization.DEFAULT_PROTOCOL)
        self.records: list[tuple[str, Deferred | torch.Tensor]] = []

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor or obj.layout != torch.strided or obj.requires_grad:
                raise ValueError("save_streamed writes plain tensors only (no subclass, sparse layout or grad)")
            dtype, shape = obj.dtype, tuple(obj.shape)
        elif isinstance(obj, Deferred):
            dtype, shape = obj.dtype, tuple(obj.shape)
        else:
            return NotImplemented
        key = str(len(self.records))  # each object once: the pickler's memo answers a second reference
        self.records.append((key, obj))
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # contiguous, as torch's
        storage = _Storage(key, dtype, math.prod(shape))
        return torch._utils._rebuild_tensor_v2, (storage, 0, shape, stride, False, OrderedDict())

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def save_streamed(obj: object, path: Path, progress: Progress | None = None, *, trim: bool = True) -> None:
    """torch.save(obj, path), two tensors in memory at a time: each Deferred is made while the record
    before it is written (tensorfile.made_ahead), and every tensor's memory-mapped pages are dropped once
    it is (see the module's docstring). trim: the memory of each tensor made is handed back once it is
    written (False for Deferreds made in reused memory: tensorfile.in_reused_memory)."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    pickled = buffer.getvalue()
    alignment = str(torch.serialization._get_storage_alignment())
    # PyTorch's writer on a file opened here (as torch.save opens one it is given, not a path): the
    # archive's folder is "archive", not named after the temporary file it is written as; an OutputFile,
    # which copies each record the zip writer hands over whole into its buffers
    total = sum(item.dtype.itemsize * math.prod(item.shape) for _, item in pickler.records)
    with (
        OutputFile(path, size=total) as file,
        torch.serialization._open_zipfile_writer(file) as writer,
        one_thread(),
    ):
        writer.write_record("data.pkl", pickled, len(pickled))
        writer.write_record(".format_version", "1", len("1"))
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for (key, item), tensor in made_ahead(pickler.records, _made):
            if tensor.dtype != item.dtype or tuple(tensor.shape) != tuple(item.shape):
                raise ValueError(f"record {key}: made {tensor.dtype} {tuple(tensor.shape)}, announced otherwise")
            data = tensor.detach().cpu().contiguous()
            size = data.numel() * data.element_size()
            _write_bytes(writer, f"data/{key}", data, size)
            del data
            made = not drop_file_pages(tensor)  # else a view of a mapped file: nothing to free
            del tensor  # the last reference (made_ahead keeps none): freed before the trim
            if made and trim:
                trim_free_memory(size)  # the writer's own small allocations pin the freed memory otherwise
            if progress:
                progress(size)


def _made(record: tuple[str, "Deferred | torch.Tensor"]) -> torch.Tensor:
    item = record[1]
    return item.make() if isinstance(item, Deferred) else item


def _write_bytes(writer: torch._C.PyTorchFileWriter, name: str, data: torch.Tensor, size: int) -> None:
    """A contiguous tensor's own bytes as a record, from where they lie (a view into a larger storage
    too: the writer takes an address and a length); a torch without that overload gets the storage, a
    view's copied out first."""
    try:
        writer.write_record(name, data.data_ptr(), size)
        return
    except TypeError:
        pass
    storage = data.untyped_storage()
    if data.storage_offset() or storage.nbytes() != size:  # a view into a larger storage
        storage = data.clone().untyped_storage()
    writer.write_record(name, storage, size)
