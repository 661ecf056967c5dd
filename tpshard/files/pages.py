"""Memory-mapped files and the pages they put in a process: every reader of weights maps its file
(torch.load's mmap=True, safetensors' safe_open), so the tensors cost no anonymous memory, but each
page read stays in the process's resident set (RSS) until it is unmapped or dropped. A command that
streams a model tensor by tensor drops each tensor's pages once it is done with them, so that its
RSS stays near one tensor's worth, not the model's: the pages stay in the kernel's page cache, and a
later read maps them again from there (or from the file) as they were.
"""

import ctypes
import functools
import mmap
import sys

import torch

MADV_DONTNEED = 4
TRIM_MARGIN = 8 << 20
_SWAPPED, _FILE = 1 << 62, 1 << 61  # /proc/self/pagemap's bits (bit 63, present: the sign)


def drop_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the pages that a CPU tensor's elements span (a view's too: from its first element to its
    last) from this process when every one of them is backed by a file (or not present): True if
    they were. A page written since it was mapped (copy-on-write: anonymous memory) is never dropped,
    nor is memory of any other kind: it would lose data. Linux only (False elsewhere)."""
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
    entries = _pagemap(start, end)
    if entries is None or _hold_data(entries) or not bool(((entries < 0) & ((entries & _FILE) != 0)).any()):
        return False  # some page is anonymous (or swapped), or none is mapped from a file
    return _madvise_dontneed(start, end)


def backed_by_file(tensor: torch.Tensor) -> bool:
    """Whether the whole pages inside a contiguous CPU tensor's bytes hold no data of their own: each
    is not present, or backed by a file; none was written since it was mapped (copy-on-write) or
    swapped out. Dropping them (drop_inner_pages) loses nothing. Linux only (False elsewhere)."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    entries = _pagemap(*_inner_pages(tensor))
    return entries is not None and not _hold_data(entries)


def drop_inner_pages(tensor: torch.Tensor) -> bool:
    """Drop the whole pages inside a contiguous tensor's bytes (never a neighbour's), unchecked: for
    the parts of a tensor found backed_by_file. True if they were."""
    return _madvise_dontneed(*_inner_pages(tensor))


def _inner_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, end) addresses of the whole pages inside a contiguous tensor's bytes."""
    page, first = mmap.PAGESIZE, tensor.data_ptr()
    return -(-first // page) * page, (first + tensor.numel() * tensor.element_size()) // page * page


def _pagemap(start: int, end: int) -> torch.Tensor | None:
    """/proc/self/pagemap's entries for the pages of [start, end); None when there are none or it
    cannot be read."""
    page = mmap.PAGESIZE
    if end <= start:
        return None
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            raw = f.read((end - start) // page * 8)
    except OSError:
        return None
    entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    return entries if entries.numel() == (end - start) // page else None


def _hold_data(entries: torch.Tensor) -> bool:
    """Whether any of the pages holds data the file does not: present and anonymous, or swapped."""
    present, swapped, file = entries < 0, (entries & _SWAPPED) != 0, (entries & _FILE) != 0  # bit 63: present
    return bool((swapped | (present & ~file)).any())


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
