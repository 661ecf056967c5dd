"""safetensors files: the dtype table, a streaming writer that hashes as it writes, reading headers,
and sha256 of files."""

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tpshard.errors import TpshardError

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
) -> str:
    """Write a safetensors file one tensor at a time and return its sha256.

    Hand-written because safetensors' save_file takes every tensor of a file at once (a whole rank in
    memory) and cannot hash while it writes; the format itself is a JSON header and raw bytes.
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
    digest = hashlib.sha256()
    prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
    # hashing runs on a second thread, one tensor behind the writing (hashlib releases the GIL)
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as hasher:
        f.write(prefix)
        hashed = hasher.submit(digest.update, prefix)
        for name, dtype, shape in layout:
            tensor = produce(name)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), name
            data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
            f.write(data)
            hashed.result()  # keeps the updates in order and at most two tensors alive
            hashed = hasher.submit(digest.update, data)
            if progress:
                progress(data.nbytes)
        hashed.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


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
