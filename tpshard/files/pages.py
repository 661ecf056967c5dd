"""Memory-mapped files and the pages they put in a process: every reader of weights maps its file
(torch.load's mmap=True, safetensors' safe_open), so the tensors cost no anonymous memory, but each
page read stays in the process's resident set (RSS) until it is unmapped or dropped. A command that
streams a model tensor by tensor drops each tensor's pages once it is done with them, so that its
RSS stays near one tensor's worth, not the model's: the pages stay in the kernel's page cache, and a
later read maps them again from there (or from the file) as they were.
"""

import ctypes
import fcntl
import functools
import mmap
import os
import sys
import threading

import torch

MADV_DONTNEED = 4
TRIM_MARGIN = 8 << 20
LARGE_FOLIO = 2 << 20  # the most that one fault on a file's page maps (a large folio, up to a PMD)
# /proc/self/pagemap: 8 bytes per page, in the machine's byte order; the top byte's top bits are bit 63
# (present), 62 (swapped) and 61 (backed by a file). Each such byte mapped to what the page is: H, it
# holds data of its own (present and anonymous: written since it was mapped, copy-on-write; or swapped
# out); F, a file's page, present; "-", neither (not present).
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
_PAGE_KINDS = bytes(
    ord("H") if top & 0b010 or top & 0b101 == 0b100 else ord("F") if top & 0b101 == 0b101 else ord("-")
    for top in (byte >> 5 for byte in range(256))
)


def drop_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the pages that a CPU tensor's elements span (a view's too: from its first element to its
    last) from this process when every one of them is backed by a file (or not present): True if
    they were. A page written since it was mapped (copy-on-write: anonymous memory) is never dropped,
    nor is memory of any other kind: it would lose data. The file's pages around them go too, where
    they can (_drop_around). Linux only (False elsewhere)."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    if any(stride < 0 for stride in tensor.stride()):
        return False
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    page = mmap.PAGESIZE
    first = tensor.data_ptr()
    # every page the elements touch, the first and last shared with neighbours included: a neighbour's
    # page dropped too comes back from the file when it is read
    start, end = first // page * page, -(-(first + span * tensor.element_size()) // page) * page
    kinds = _page_kinds(start, end)
    if kinds is None or b"H" in kinds or b"F" not in kinds:
        return False  # some page is anonymous (or swapped), or none is mapped from a file
    _drop_around(tensor, start, end)
    return _madvise_dontneed(start, end)


def _drop_around(tensor: torch.Tensor, start: int, end: int) -> None:
    """Drop the pages within LARGE_FOLIO before and after [start, end), where none of them holds data
    of its own: reading the range mapped them (a fault maps a file's large folio whole), and the
    neighbours they belong to may be done with already. Only inside the mapping of the file that
    holds the tensor, which the tensor keeps mapped: as the kernel tells it now (_file_mapping), else
    the tensor's own storage (a view's elements may be a part of it)."""
    mapping = _file_mapping(start)
    if mapping is None:
        storage = tensor.untyped_storage()
        mapping = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    for lo, hi in ((max(mapping[0], start - LARGE_FOLIO), start), (end, min(mapping[1], end + LARGE_FOLIO))):
        kinds = _page_kinds(lo, hi)
        if kinds is not None and b"H" not in kinds and b"F" in kinds:
            _madvise_dontneed(lo, hi)


def backed_by_file(tensor: torch.Tensor) -> bool:
    """Whether the whole pages inside a contiguous CPU tensor's bytes hold no data of their own: each
    is not present, or backed by a file; none was written since it was mapped (copy-on-write) or
    swapped out. Dropping them (drop_inner_pages) loses nothing. Linux only (False elsewhere)."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    kinds = _page_kinds(*_inner_pages(tensor))
    return kinds is not None and b"H" not in kinds


def drop_inner_pages(tensor: torch.Tensor) -> bool:
    """Drop the whole pages inside a contiguous tensor's bytes (never a neighbour's), unchecked: for
    the parts of a tensor found backed_by_file. True if they were."""
    return _madvise_dontneed(*_inner_pages(tensor))


def _inner_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, end) addresses of the whole pages inside a contiguous tensor's bytes."""
    page, first = mmap.PAGESIZE, tensor.data_ptr()
    return -(-first // page) * page, (first + tensor.numel() * tensor.element_size()) // page * page


def _page_kinds(start: int, end: int) -> bytes | None:
    """What each page of [start, end) is (_PAGE_KINDS: one byte a page), from /proc/self/pagemap; None
    when there are none or it cannot be read."""
    page = mmap.PAGESIZE
    if end <= start:
        return None
    try:
        raw = os.pread(_proc_self("pagemap"), (end - start) // page * 8, start // page * 8)
    except OSError:
        return None
    return raw[_TOP_BYTE::8].translate(_PAGE_KINDS) if len(raw) == (end - start) // page * 8 else None


class _MapQuery(ctypes.Structure):
    """Linux's struct procmap_query (<linux/fs.h>): the mapping that holds an address, asked of
    /proc/self/maps with the PROCMAP_QUERY ioctl (Linux 6.11)."""

    _fields_ = [
        *((name, ctypes.c_uint64) for name in ("size", "query_flags", "query_addr", "vma_start", "vma_end")),
        *((name, ctypes.c_uint64) for name in ("vma_flags", "vma_page_size", "vma_offset", "inode")),
        *((name, ctypes.c_uint32) for name in ("dev_major", "dev_minor", "vma_name_size", "build_id_size")),
        *((name, ctypes.c_uint64) for name in ("vma_name_addr", "build_id_addr")),
    ]


_PROCMAP_QUERY = 3 << 30 | ctypes.sizeof(_MapQuery) << 16 | ord("f") << 8 | 17  # _IOWR('f', 17, struct procmap_query)
_FILE_BACKED_VMA = 0x20


def _file_mapping(address: int) -> tuple[int, int] | None:
    """[start, end) of the mapping of a file that holds address, as it is now; None when no file's
    mapping holds it, or the kernel cannot say (before Linux 6.11)."""
    query = _MapQuery(size=ctypes.sizeof(_MapQuery), query_flags=_FILE_BACKED_VMA, query_addr=address)
    try:
        fcntl.ioctl(_proc_self("maps"), _PROCMAP_QUERY, query)
    except OSError:
        return None
    return query.vma_start, query.vma_end


_proc_fds: dict[str, tuple[int, int]] = {}  # name -> (pid, fd): /proc/self is the process that opened it
_proc_lock = threading.Lock()  # pages are dropped on several threads: one opens each file


def _new_proc_lock() -> None:
    """In a forked child: a lock another thread held at the fork would never be let go."""
    global _proc_lock
    _proc_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_proc_lock)


def _proc_self(name: str) -> int:
    """/proc/self/<name>, open for reading: once per process (again in a forked child)."""
    with _proc_lock:
        pid, fd = _proc_fds.get(name, (-1, -1))
        if pid != os.getpid():
            fd = os.open(f"/proc/self/{name}", os.O_RDONLY | os.O_CLOEXEC)
            _proc_fds[name] = os.getpid(), fd
        return fd


def _madvise_dontneed(start: int, end: int) -> bool:
    return end > start and _libc().madvise(start, end - start, MADV_DONTNEED) == 0


def trim_free_memory(freed: int) -> None:
    """Hand the C allocator's free memory back to the kernel (glibc's malloc_trim(0), which also
    releases the whole pages inside free chunks) once it holds more than twice what was just freed
    (`freed` bytes, which the next tensor will take again) and TRIM_MARGIN. A long stream of large
    tensors, each made and freed while small allocations that live on (a zip writer's directory, a
    trace's activations) land between them, otherwise leaves freed memory resident in the holes:
    anonymous memory that grows with the number of tensors, not their size. Trimming every time would
    cost a page fault for each page of the next tensor. Nothing to do where the C library has no
    malloc_trim and mallinfo2 (glibc 2.33)."""
    libc = _libc() if sys.platform == "linux" else None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallinfo2"):
        return
    if libc.mallinfo2().fordblks > 2 * freed + TRIM_MARGIN:
        libc.malloc_trim(0)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage (one was not copied from the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
