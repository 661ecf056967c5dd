"""safetensors files: the dtype table, a streaming writer that hashes as it writes, reading headers,
sha256 of files, and TensorSource: tensors made one at a time, for the writers that stream."""

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

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
    tensor's memory-mapped pages (a piece that is a view of its source) are dropped once it is written
    and hashed, so that the process holds about one tensor, not the file.
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
    # hashing runs on a second thread, one tensor behind the writing (hashlib releases the GIL)
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as hasher:
        f.write(prefix)
        hashed = hasher.submit(digest.update, prefix) if digest else None
        hashing: torch.Tensor | None = None  # the tensor the hasher is reading
        for name, dtype, shape in layout:
            tensor = produce(name)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), name
            data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
            f.write(data)
            size = data.nbytes
            if progress:
                progress(size)
            if hashed is not None:
                hashed.result()  # keeps the updates in order and at most two tensors alive
            if hashing is not None:
                drop_file_pages(hashing)  # written and hashed
            if digest is not None:
                hashed, hashing = hasher.submit(digest.update, data), tensor
            else:
                drop_file_pages(tensor)
            del tensor, data  # before the next is made: the allocator reuses its memory
            trim_free_memory(size)
        if hashed is not None:
            hashed.result()
        if hashing is not None:
            drop_file_pages(hashing)
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
