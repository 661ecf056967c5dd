"""safetensors files: the dtype table, a streaming writer that hashes as it writes, reading headers,
sha256 of files, and TensorSource: tensors made one at a time, for the writers that stream."""

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from tpshard.errors import TpshardError
from tpshard.files.pages import drop_file_pages, trim_free_memory

# The one dtype table: the name tpshard uses (manifest, --dtype, reports), torch's dtype, safetensors' code.
_TABLE = (
    ("float32", torch.float32, "F32"),
    ("float16", torch.float16, "F16"),
    ("bfloat16", torch.bfloat16, "BF16"),
    ("float64", torch.float64, "F64"),
)
DTYPES = {name: dtype for name, dtype, _ in _TABLE}
DTYPE_NAMES = {dtype: name for name, dtype, _ in _TABLE}
SAFETENSORS_CODES = {dtype: code for _, dtype, code in _TABLE}
NAMES_BY_CODE = {code: name for name, _, code in _TABLE}

CHUNK = 8 << 20
Progress = Callable[[int], None]  # called with the number of bytes just done
Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # a file's tensors: name, dtype, shape, in order


class TensorSource(Mapping[str, torch.Tensor]):
    """Named tensors, each made only when it is asked for and kept by no one here: a shard set's dense
    tensors put together from their pieces, say. Their names, dtypes and shapes (the layout) are known
    without making any, so that a writer can lay out its file first and then take them one by one."""

    def __init__(self, layout: Layout, make: Callable[[str], torch.Tensor]):
        self.layout = layout
        self._make = make
        self._names = {name: None for name, _, _ in layout}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """Each tensor's name, dtype and shape, in order; a TensorSource's without making any."""
    if isinstance(tensors, TensorSource):
        return tensors.layout
    return [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))  # reused: a fresh 8 MB per read is page faults and munmaps
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(buffer[:size])
            if progress:
                progress(size)
    return digest.hexdigest()


class BackgroundHash:
    """sha256 of a file computed on another thread while the main one works (hashlib and file reads
    release the GIL, so the two cores share the work)."""

    def __init__(self, path: Path):
        self.result: str | None = None
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self.result = sha256_file(path)
        except OSError as e:
            self.error = e

    def get(self) -> str:
        self._thread.join()
        if self.error is not None:
            raise TpshardError(f"{self.error.filename}: cannot read to hash it ({self.error.strerror})")
        assert self.result is not None
        return self.result


# Every write of tensor data goes through a small staging buffer, filled just before it is written.
# Measured on this project's machine (a VM, 2 cores): write() straight from a large tensor moves 0.13-0.5
# GB/s, nearly all of it the kernel's copy out of user memory that is not in the cache; the same bytes
# copied into a 1 MB buffer first and written from there, 1-1.5 GB/s (the extra copy, in user space,
# runs at 3.5 GB/s). It also means a view (a transposed weight, a column cut) is written where it lies,
# a stage at a time, never copied whole first.
STAGE_BYTES = 1 << 20


class Staging:
    """The staging buffers that a writer's chunks are copied into, used in turn: with two, one can be
    hashed on another thread while the next is filled and written."""

    def __init__(self, count: int = 1, nbytes: int = STAGE_BYTES):
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count)]
        self.views = [memoryview(b.numpy()) for b in self.buffers]
        self.nbytes = nbytes
        self.scratch = torch.empty(nbytes, dtype=torch.uint8)  # a transposed block's columns, gathered
        self._turn = 0

    def next(self) -> tuple[torch.Tensor, memoryview]:
        turn, self._turn = self._turn, (self._turn + 1) % len(self.buffers)
        return self.buffers[turn], self.views[turn]


def tensor_chunks(tensor: torch.Tensor, staging: Staging) -> Iterator[memoryview]:
    """A CPU tensor's bytes in row-major order, at most a stage at a time, each chunk copied into the
    next staging buffer and yielded as a view of it (valid until that buffer comes round again). Any
    strides: a transposed or cut view is read where it lies, a block of rows at a time."""
    if tensor.is_contiguous():
        flat = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        for start in range(0, len(flat), staging.nbytes):
            _, view = staging.next()
            n = min(staging.nbytes, len(flat) - start)
            view[:n] = flat[start : start + n]
            yield view[:n]
        return
    if tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.shape[0] > 1:
        yield from _transposed_chunks(tensor, staging)
        return
    row = tensor.element_size() * math.prod(tensor.shape[1:])
    if row > staging.nbytes:  # a row larger than a stage: row by row, each cut further
        for r in range(tensor.shape[0]):
            yield from tensor_chunks(tensor[r], staging)
        return
    step = staging.nbytes // row
    for start in range(0, tensor.shape[0], step):
        block = tensor[start : start + step]
        buffer, view = staging.next()
        n = block.numel()
        buffer.view(tensor.dtype)[:n].view(block.shape).copy_(block)
        yield view[: n * tensor.element_size()]


def _transposed_chunks(tensor: torch.Tensor, staging: Staging) -> Iterator[memoryview]:
    """tensor_chunks of a transposed matrix (stride (1, n): an HF Conv1D weight, say): a block of its
    rows is a block of columns of the matrix it views, gathered into the scratch buffer (rows of a few
    contiguous elements each), then transposed into the stage by torch's blocked transpose. Copying the
    block straight from the strided view reads one element per cache line, 4-20x slower (measured)."""
    rows, cols = tensor.shape
    source = tensor.t()  # (cols, rows), its rows contiguous
    if cols * tensor.element_size() > staging.nbytes:
        for r in range(rows):
            yield from tensor_chunks(tensor[r], staging)
        return
    step = staging.nbytes // (cols * tensor.element_size())
    for start in range(0, rows, step):
        k = min(step, rows - start)
        gathered = staging.scratch.view(tensor.dtype)[: cols * k].view(cols, k)
        gathered.copy_(source[:, start : start + k])
        buffer, view = staging.next()
        buffer.view(tensor.dtype)[: cols * k].view(k, cols).copy_(gathered.t())
        yield view[: cols * k * tensor.element_size()]


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while a file is written: the copies a writer makes (a stage, a piece put
    together) are a megabyte or a few, memory-bound, and on two threads each ends at a barrier that
    waits for the other; on this project's shared 2-core machine (a hasher thread on the other core)
    a transposed stage copied 2.1-2.7 GB/s on one thread, 0.3-0.8 GB/s on two (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StagedFile:
    """A binary file whose large writes go through a staging buffer (see STAGE_BYTES): what torch's
    own writers (torch.save's zip writer, DCP's) are handed, since they write each record whole."""

    def __init__(self, file: BinaryIO, staging: Staging | None = None):
        self.file = file
        self.staging = staging or Staging()

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")
        if len(view) <= self.staging.nbytes:
            return self.file.write(view)
        for start in range(0, len(view), self.staging.nbytes):
            _, stage = self.staging.next()
            n = min(self.staging.nbytes, len(view) - start)
            stage[:n] = view[start : start + n]
            self.file.write(stage[:n])
        return len(view)

    def __getattr__(self, name: str) -> object:  # tell, seek, flush, fileno, close: the file's own
        return getattr(self.file, name)


def write_safetensors(
    path: Path,
    layout: Layout,
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    progress: Progress | None = None,
    *,
    sha256: bool = True,
) -> str | None:
    """Write a safetensors file one tensor at a time, and return its sha256 (None when sha256=False:
    a dense output, which nothing records the hash of).

    Hand-written because safetensors' save_file takes every tensor of a file at once (a whole rank in
    memory) and cannot hash while it writes; the format itself is a JSON header and raw bytes. Each
    tensor goes out through the staging buffers (tensor_chunks: a view is never copied whole), each
    chunk hashed on a second thread while the next is filled and written (hashlib releases the GIL);
    its memory-mapped pages (a piece that is a view of its source) are dropped once it is written, so
    that the process holds about one tensor, not the file.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        entry = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        header[name] = entry
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data, as safetensors does
    digest = hashlib.sha256() if sha256 else None
    prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
    staging = Staging(2 if digest else 1)
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as hasher, one_thread():
        f.write(prefix)
        if digest is not None:
            digest.update(prefix)
        hashed = None  # the hash of the last chunk written, running: its buffer is not filled again before it ends
        for name, dtype, shape in layout:
            tensor = produce(name)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), name
            for chunk in tensor_chunks(tensor, staging):
                f.write(chunk)
                if digest is not None:
                    if hashed is not None:
                        hashed.result()
                    hashed = hasher.submit(digest.update, chunk)
            size = tensor.numel() * tensor.element_size()
            if progress:
                progress(size)
            drop_file_pages(tensor)  # written (the hasher reads the staging buffers, not the tensor)
            del tensor  # before the next is made: the allocator reuses its memory
            trim_free_memory(size)
        if hashed is not None:
            hashed.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest() if digest else None


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safetensors' safe_open, with an unreadable file as one TpshardError line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise TpshardError(f"{path}: not a readable safetensors file ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped."""
    with open_safetensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)


def data_offsets(path: Path) -> dict[str, int]:
    """Each tensor's first byte in a safetensors file (8-byte header length, JSON header, data); {}
    when the header cannot be read."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, path.stat().st_size)))
        return {name: 8 + length + t["data_offsets"][0] for name, t in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return {}
