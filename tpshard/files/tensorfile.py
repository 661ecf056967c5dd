"""safetensors files: the dtype table, OutputFile (every writer's way to the disk), a streaming safetensors
writer that hashes as it writes, reading headers, and TensorSource: tensors made one at a time, for the
writers that stream."""

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import queue
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open

from tpshard.errors import TpshardError
from tpshard.files.digests import Progress
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

Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # a file's tensors: name, dtype, shape, in order
T = TypeVar("T")


class TensorSource(Mapping[str, torch.Tensor]):
    """Named tensors, each made only when it is asked for and kept by no one here: a shard set's dense
    tensors put together from their pieces, say. Their names, dtypes and shapes (the layout) are known
    without making any, so that a writer can lay out its file first and then take them one by one.
    reused: the tensors are made in memory that make keeps and makes the next ones in (a tpshard
    writer's source, convert.merge_to): letting one go frees nothing."""

    def __init__(self, layout: Layout, make: Callable[[str], torch.Tensor], *, reused: bool = False):
        self.layout = layout
        self.reused = reused
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


def in_reused_memory(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether tensors are made in reused memory (TensorSource's reused): a writer that lets one go
    has nothing to hand back (trim_free_memory)."""
    return isinstance(tensors, TensorSource) and tensors.reused


# Every output file is written front to back through a few page-aligned buffers: the writers copy into them
# (a tensor a block of rows at a time, whatever its strides: a view is never copied whole), and each full one
# goes to the disk on a writer thread while the next fills, hashed on another thread first when the file's
# sha256 is wanted. A large file goes from the buffers to the disk with O_DIRECT, where the file system takes
# it: a write() through the page cache costs a second copy and a fresh page of memory for every 4 kB
# written, which on a VM whose host takes back the memory its guest frees costs several times the disk's
# own time (README, "Models bigger than memory"), and a large output cached whole pushes out of the cache
# the input it is made from. A small one is worth its cache: the next command reads it from there.
BUFFER_BYTES = 1 << 20
DIRECT_BUFFER_BYTES = 4 << 20  # fewer, larger writes where each waits for the disk
BUFFERS = 8
ALIGN = 4096  # O_DIRECT's unit for addresses, lengths and offsets: a multiple of every common block size
DIRECT_BYTES = 256 << 20  # outputs from this size on bypass the page cache


class OutputFile:
    """A new file, written front to back through BUFFERS page-aligned buffers of BUFFER_BYTES (from
    DIRECT_BYTES on, DIRECT_BUFFER_BYTES), and a scratch buffer of the same size: write() and
    write_tensor() fill them, and each full one goes out on a writer thread while the next fills (hashed
    on another one first, with sha256=True). size, about the bytes it will hold: from DIRECT_BYTES on,
    O_DIRECT where the file system takes it. close() writes the last, partial buffer, fsyncs and returns
    the sha256 (None without). Also a file object for torch's own writers: tell(), fileno(), and a
    flush() that does nothing (the buffers go out as they fill, the last at close)."""

    def __init__(self, path: Path, *, sha256: bool = False, size: int = 0):
        self._size = DIRECT_BUFFER_BYTES if size >= DIRECT_BYTES else BUFFER_BYTES
        # page-aligned, as O_DIRECT needs; touched at once, so that a file's memory is the same however
        # much it holds
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._memory = mmap.mmap(-1, BUFFERS * self._size, flags=flags)
        self._bytes = torch.frombuffer(self._memory, dtype=torch.uint8)
        self._view = memoryview(self._memory)
        self._scratch = torch.empty(self._size, dtype=torch.uint8)  # a transposed block; a row across two buffers
        self._turn, self._fill, self._told = 0, 0, 0  # the buffer being filled, the bytes in it, the bytes so far
        self._hashed: list[Future | None] = [None] * BUFFERS  # each buffer's hash, running
        self._written = [threading.Event() for _ in range(BUFFERS)]  # each buffer's write, done
        for written in self._written:
            written.set()
        self._to_write: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # full buffers; None: no more
        self._write_error: BaseException | None = None
        self._digest = hashlib.sha256() if sha256 else None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpshard-hash") if sha256 else None
        self._closed = False
        self._result: str | None = None
        self._failure: BaseException | None = None  # what ended the file unfinished, for every close() to raise
        self._writer = threading.Thread(target=self._write_full_buffers, name="tpshard-write", daemon=True)
        self._fd, self._direct = _open_for_writing(Path(path), direct=size >= DIRECT_BYTES)  # last: nothing to leak
        try:
            self._writer.start()
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        if kind is None:
            self.close()
        elif not self._closed:  # failed: the caller removes the file
            # a write's failure is the cause: torch's zip writer, say, reports only that it came up short
            self._closed, self._failure = True, self._write_error or error
            self._shutdown()
            if self._failure is not error:
                raise self._failure

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")
        if len(view) > BUFFER_BYTES:  # a record torch's writers hand over whole: copied by torch, without the GIL
            self._write_bytes(_uint8_tensor(view))
            return len(view)
        done = 0
        while done < len(view):
            n = min(self._size - self._fill, len(view) - done)
            start = self._turn * self._size + self._fill
            self._view[start : start + n] = view[done : done + n]
            self._advance(n)
            done += n
        return len(view)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """A CPU tensor's elements in row-major order, whatever its strides: a transposed or cut view is
        read where it lies, a block of rows at a time, straight into the buffers."""
        if tensor.is_contiguous():
            self._write_bytes(tensor.reshape(-1).view(torch.uint8))
            return
        rows, size = tensor.shape[0], tensor.element_size()
        row = size * math.prod(tensor.shape[1:])
        if row > self._size:  # a row larger than a buffer: row by row, each cut further
            for r in range(rows):
                self.write_tensor(tensor[r])
            return
        start = 0
        while start < rows:
            fit = (self._size - self._fill) // row if self._fill % size == 0 else 0
            if fit:
                k = min(fit, rows - start)
                block = self._free(k * row).view(tensor.dtype).view(k, *tensor.shape[1:])
                _copy_block(block, tensor[start : start + k], self._scratch)
                self._advance(k * row)
            else:  # no whole row before this buffer's end: one row through the scratch buffer
                k = 1
                self._scratch[:row].view(tensor.dtype).view(tensor.shape[1:]).copy_(tensor[start])
                self._write_bytes(self._scratch[:row])
            start += k

    def _write_bytes(self, flat: torch.Tensor) -> None:
        done = 0
        while done < flat.numel():
            n = min(self._size - self._fill, flat.numel() - done)
            self._free(n).copy_(flat[done : done + n])
            self._advance(n)
            done += n

    def _free(self, n: int) -> torch.Tensor:
        """The next n bytes of the buffer being filled (n at most what is left of it)."""
        start = self._turn * self._size + self._fill
        return self._bytes[start : start + n]

    def _advance(self, n: int) -> None:
        self._fill += n
        self._told += n
        if self._fill == self._size:
            self._send()

    def _send(self) -> None:
        """Hand the full buffer to the hasher and the writer, and make the next one ready to fill."""
        turn = self._turn
        if self._hasher is not None:
            assert self._digest is not None
            self._hashed[turn] = self._hasher.submit(self._digest.update, self._buffer(turn, self._size))
        self._written[turn].clear()
        self._to_write.put(turn)
        self._turn, self._fill = (turn + 1) % BUFFERS, 0
        self._done_with(self._turn)  # before it is filled again

    def _done_with(self, turn: int) -> None:
        """Wait until buffer turn is written and hashed; raise what writing or hashing raised."""
        self._written[turn].wait()
        hashed, self._hashed[turn] = self._hashed[turn], None
        if hashed is not None:
            hashed.result()
        if self._write_error is not None:
            raise self._write_error

    def _buffer(self, turn: int, size: int) -> memoryview:
        return self._view[turn * self._size : turn * self._size + size]

    def _write_full_buffers(self) -> None:
        """The writer thread: every full buffer, in order; with O_DIRECT, those that are ready together in
        one call. (Each call needs the GIL only to start and to end, and a torch call can hold it for
        milliseconds: the CRC-32 of a record, say. One call for all the buffers ready keeps the disk busy
        meanwhile.) Through the page cache, one buffer a call: the cache holds what a write brings in
        folios as large as the write (up to 2 MB), and a process that maps the file later has a whole
        folio mapped on each fault, neighbours and all (files/pages.py)."""
        stop = False
        while not stop:
            turns = [self._to_write.get()]
            while self._direct and not self._to_write.empty():
                turns.append(self._to_write.get())
            stop = turns[-1] is None
            ready = [turn for turn in turns if turn is not None]
            try:
                if self._write_error is None:
                    self._write_views([self._buffer(turn, self._size) for turn in ready])
            except BaseException as e:  # for the filling thread to raise
                self._write_error = e
            for turn in ready:
                self._written[turn].set()

    def _write_views(self, views: list[memoryview]) -> None:
        views = [view for view in views if len(view)]
        while views:
            try:
                written = os.writev(self._fd, views)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._set_direct(False)  # O_DIRECT taken at open and refused now (after a short write, say)
                continue
            while written and written >= len(views[0]):
                written -= len(views.pop(0))
            if written:
                views[0] = views[0][written:]

    def _set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        self._direct = on

    def close(self) -> str | None:
        """Write what is left, fsync; the file's sha256 (None without sha256=True). Once; again, the same
        answer: the sha256, or what failed the first time, raised again."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            return self._result
        self._closed = True
        try:
            self._finish()
        except BaseException as e:
            self._failure = e
            raise
        finally:
            self._shutdown()
        self._result = self._digest.hexdigest() if self._digest is not None else None
        return self._result

    def _finish(self) -> None:
        self._stop_writer()
        for turn in range(BUFFERS):
            self._done_with(turn)
        tail = self._buffer(self._turn, self._fill)
        if self._digest is not None:
            self._digest.update(tail)
        if self._direct and len(tail) % ALIGN:
            self._set_direct(False)  # the last block is partial
        self._write_views([tail])
        os.fsync(self._fd)

    def _stop_writer(self) -> None:
        self._to_write.put(None)
        self._writer.join()

    def _shutdown(self) -> None:
        if self._writer.is_alive():
            self._stop_writer()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)

    def tell(self) -> int:
        return self._told

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass


def _uint8_tensor(view: memoryview) -> torch.Tensor:
    """A uint8 tensor over view's memory, nothing copied (read-only memory too: it is only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        return torch.frombuffer(view, dtype=torch.uint8)


def _open_for_writing(path: Path, *, direct: bool) -> tuple[int, bool]:
    """A new (or truncated) file open for writing, and whether with O_DIRECT (if asked for, and taken)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a file system without O_DIRECT
                raise
    return os.open(path, flags, 0o666), False


def _copy_block(dst: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor) -> None:
    """dst.copy_(src); a transposed matrix (stride (1, n): an HF Conv1D weight, say) by way of scratch:
    its columns gathered there (rows of a few contiguous elements each), then transposed into dst by
    torch's blocked transpose. Copied straight from the strided view, it is read one element per cache
    line, several times slower."""
    if src.dim() != 2 or src.stride(0) != 1 or src.shape[0] == 1:
        dst.copy_(src)
        return
    gathered = scratch.view(src.dtype)[: src.numel()].view(src.shape[1], src.shape[0])
    gathered.copy_(src.t())
    dst.copy_(gathered.t())


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while a file is written: the copies a writer makes (a block of a buffer, a
    piece put together) are a megabyte or a few, memory-bound, and on two threads each ends at a barrier
    that waits for the other, while the hasher and writer threads want the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_safetensors(
    path: Path,
    layout: Layout,
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    progress: Progress | None = None,
    *,
    sha256: bool = True,
    trim: bool = True,
) -> str | None:
    """Write a safetensors file one tensor at a time, and return its sha256 (None when sha256=False:
    a dense output, which nothing records the hash of). produce(name) gives each tensor of the layout,
    in its shape or in any other that holds its elements in row-major order (a q, k, v piece as
    (3, rows, ...), a view of the dense tensor). trim: the memory of each tensor made is handed back
    once it is written (False for tensors in reused memory: in_reused_memory).

    Hand-written because safetensors' save_file takes every tensor of a file at once (a whole rank in
    memory) and cannot hash while it writes; the format itself is a JSON header and raw bytes. Each
    tensor is copied into the OutputFile's buffers (a view a block at a time, never copied whole), which
    are hashed and written on other threads, while the next is made on another (made_ahead); its
    memory-mapped pages (a piece that is a view of its source) are dropped once copied, so that the
    process holds about two tensors, not the file.
    """
    files = [(path, layout, metadata)]
    return write_safetensors_files(files, lambda _, name: produce(name), progress, sha256=sha256, trim=trim)[0]


SafetensorsFile = tuple[Path, Layout, dict[str, str]]  # where, its tensors, its metadata


def write_safetensors_files(
    files: list[SafetensorsFile],
    produce: Callable[[int, str], torch.Tensor],
    progress: Progress | None = None,
    *,
    sha256: bool = True,
    trim: bool = True,
) -> list[str | None]:
    """write_safetensors of several files side by side, produce(i, name) giving the tensors of files[i]:
    the first tensor of each file in turn, then the second, ..., so that each file's hash (a sequence
    that cannot be split) runs on a thread of its own at the same time as the others'; and the pieces
    that a split or reshard cuts from one tensor for each rank are read one after the other."""
    headers = [_header(layout, metadata) for _, layout, metadata in files]
    sizes = [len(header) + sum(dtype.itemsize * math.prod(shape) for _, dtype, shape in layout)
             for header, (_, layout, _) in zip(headers, files, strict=True)]
    with ExitStack() as files_open, one_thread():
        outs = [
            files_open.enter_context(OutputFile(path, sha256=sha256, size=size))
            for (path, _, _), size in zip(files, sizes, strict=True)
        ]
        for out, header in zip(outs, headers, strict=True):
            out.write(header)
        longest = max(len(layout) for _, layout, _ in files)
        order = [(i, layout[at]) for at in range(longest) for i, (_, layout, _) in enumerate(files) if at < len(layout)]
        for (index, entry), tensor in made_ahead(order, lambda item: produce(item[0], item[1][0])):
            own_bytes = _write_out(outs[index], tensor, entry, progress)
            del tensor  # the last reference (made_ahead keeps none): freed before the trim
            if own_bytes and trim:
                trim_free_memory(own_bytes)
        return [out.close() for out in outs]


def made_ahead(items: list[T], make: Callable[[T], torch.Tensor]) -> Iterator[tuple[T, torch.Tensor]]:
    """(item, make(item)) for each item in turn, the next one's tensor made on another thread while the
    caller uses this one's (torch's copies let go of the GIL): a writer puts the next tensor together
    as it writes this one, on the other core. Two tensors alive at a time, not one; no reference to a
    tensor is kept here once it is handed over, so that the caller's `del` frees it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpshard-make") as maker:
        ahead = maker.submit(make, items[0]) if items else None
        for at, item in enumerate(items):
            assert ahead is not None
            made = [ahead.result()]  # the future that held it is replaced next: only this list holds it
            ahead = maker.submit(make, items[at + 1]) if at + 1 < len(items) else None
            yield item, made.pop()


def _header(layout: Layout, metadata: dict[str, str]) -> bytes:
    """A safetensors file's 8-byte length and JSON header, padded so that the data is aligned as
    safetensors aligns it."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        entry = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        header[name] = entry
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_out(
    out: OutputFile,
    tensor: torch.Tensor,
    entry: tuple[str, torch.dtype, tuple[int, ...]],
    progress: Progress | None,
) -> int:
    """One tensor of the layout (entry) into out: in its shape, or in one that holds the same elements
    in order. Then its memory-mapped pages dropped (the buffers are written and hashed, not the tensor).
    Returns the bytes of memory of its own it holds (0 for a view of a mapped file): what freeing it
    gives back."""
    name, dtype, shape = entry
    assert tensor.dtype == dtype and tensor.numel() == math.prod(shape), name
    out.write_tensor(tensor)
    size = tensor.numel() * tensor.element_size()
    if progress:
        progress(size)
    return 0 if drop_file_pages(tensor) else size


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safetensors' safe_open, with an unreadable file as one TpshardError line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise TpshardError(f"{path}: not a readable safetensors file ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped, with the pages that making it mapped (its
    first bytes are read) dropped at once: what the kernel maps around them (a large folio, up to
    2 MB) would otherwise stay mapped for the whole file, tensor after tensor."""
    tensors = {}
    with open_safetensors(path) as f:
        for name in f.keys():  # noqa: SIM118 (not iterable)
            tensors[name] = f.get_tensor(name)
            drop_file_pages(tensors[name])
    return tensors


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
