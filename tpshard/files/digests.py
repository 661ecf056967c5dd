"""sha256 of whole files, hashed on background threads (file reads and hashlib release the GIL): started as
soon as a command knows which files it reads, before torch is imported (a second of one core), and taken
up later by the code that needs the digest: of the file as it was when begun, which must not have changed
since. Imports no torch, so that the CLI can start them first."""

import errno
import hashlib
import mmap
import os
import queue
import stat
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tpshard.errors import TpshardError, first_line

# read, and hashed in one call, at a time, into one buffer: the read and hashlib let go of the GIL, and
# take it again after; a call of a few milliseconds is not held up much by a thread that keeps the GIL
# for several (torch's import, say). (Hashing from a memory map costs a little less CPU, but a file cut
# short or unreadable while mapped kills the process with SIGBUS, where a read fails with one line.)
READ_BYTES = 4 << 20
Progress = Callable[[int], None]  # called with the number of bytes just done
Identity = tuple[int, ...]  # a regular file's device, inode, size, modification and change times (_identity)


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The file's sha256. Anything but a regular file is refused (OSError), and so is a file that
    changes while it is read (TpshardError)."""
    return _hash(Path(path), _identity(path), progress)


def _hash(path: Path, expected: Identity | None, progress: Progress | None) -> str:
    """sha256 of path's file, READ_BYTES at a time, if it is (and stays, until read to its end) the
    file of identity expected."""
    changed = TpshardError(f"{path}: changed while it was being hashed; run again once nothing writes to it")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without waiting for a writer
    with open(fd, "rb", buffering=0) as f:
        found = _identity_of(os.fstat(fd))
        if found is None:  # a FIFO would block the reader, a device never end
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if found != expected:
            raise changed
        digest = hashlib.sha256()
        # mapped for this file alone, unmapped after: a freed block of this size, the C allocator keeps
        with mmap.mmap(-1, READ_BYTES) as memory, memoryview(memory) as buffer:
            while size := f.readinto(buffer):
                digest.update(buffer[:size])
                if progress:
                    progress(size)
        if _identity_of(os.fstat(fd)) != found:
            raise changed
    return digest.hexdigest()


class FileHash:
    """The sha256 of one file, computed by a background worker (see _submit), of the file path was when
    the hash was begun (identity): one that is replaced or written to from then on fails digest().
    Progress attached at any time gets the bytes hashed so far at once, then the rest as they are hashed."""

    def __init__(self, path: Path, identity: Identity | None):
        self.path = Path(path)
        self.identity = identity
        self._lock = threading.Lock()
        self._hashed = 0
        self._progress: Progress | None = None
        self._digest: str | None = None
        self._error: Exception | None = None
        self._finished = threading.Event()
        _submit(self)

    def run(self) -> None:
        """Hash the file; whatever fails is kept for digest() to raise, never the worker's end."""
        try:
            with _quick_handover():
                self._digest = _hash(self.path, self.identity, self._advance)
        except (OSError, TpshardError) as e:
            self._error = e
        except Exception as e:  # a bug's: one line too, and the worker goes on to the next file
            self._error = TpshardError(f"{self.path}: cannot hash it ({type(e).__name__}: {first_line(e)})")
        finally:
            self._finished.set()

    def _advance(self, size: int) -> None:
        with self._lock:
            self._hashed += size
            progress = self._progress
        if progress:
            progress(size)

    def attach(self, progress: Progress | None) -> None:
        if progress is None:
            return
        with self._lock:
            self._progress, hashed = progress, self._hashed
        progress(hashed)

    def digest(self) -> str:
        """The hex digest, once hashed, of the file that is still at path: raises the OSError reading it
        raised, if one did, and TpshardError if it changed while it was hashed or since (its identity,
        taken again now)."""
        self._finished.wait()
        if self._error is not None:
            raise self._error
        if _identity(self.path) != self.identity:
            raise TpshardError(f"{self.path}: changed since it was hashed; run again once nothing writes to it")
        assert self._digest is not None
        return self._digest


# While a hash runs, a thread that holds the GIL hands it over after SWITCH_SECONDS, not Python's 5 ms: a
# worker needs it for microseconds between reads of a few milliseconds each, and otherwise waits that long
# for it each time while another thread keeps it busy (torch's import, which the hashes run beside; split
# waits for its source's hash at the end).
SWITCH_SECONDS = 0.0005
_running = 0  # hashes running now
_interval_before = 0.0  # the switch interval before the first of them began
_running_lock = threading.Lock()


@contextmanager
def _quick_handover() -> Iterator[None]:
    global _running, _interval_before
    with _running_lock:
        if _running == 0:
            _interval_before = sys.getswitchinterval()
            sys.setswitchinterval(min(_interval_before, SWITCH_SECONDS))
        _running += 1
    try:
        yield
    finally:
        with _running_lock:
            _running -= 1
            if _running == 0:
                sys.setswitchinterval(_interval_before)


# A worker per core but one, left to the command's own thread (torch's import, then the writer: its time
# is the command's; on 2 cores a second worker made a merge about 5% slower, bench_memory's files), at
# least one; daemon threads: a failed or interrupted command never waits for a hash to end.
_jobs: "queue.SimpleQueue[FileHash]" = queue.SimpleQueue()
_workers: list[threading.Thread] = []
_workers_lock = threading.Lock()
_started: dict[tuple[int, ...], FileHash] = {}  # by the file's identity (see _identity)
_started_lock = threading.Lock()


_unfinished: "weakref.WeakSet[FileHash]" = weakref.WeakSet()  # submitted, not yet hashed


def _forget_the_parents() -> None:
    """In a forked child: the parent's workers did not come along (and a lock may have been held), so
    a hash they had not finished never will be here: it fails, in one line, rather than wait forever."""
    global _jobs, _workers, _workers_lock, _started, _started_lock, _running, _running_lock
    _jobs, _workers, _workers_lock = queue.SimpleQueue(), [], threading.Lock()
    _started, _started_lock = {}, threading.Lock()
    if _running:  # the parent's hashes that were running: here, none is
        sys.setswitchinterval(_interval_before)
    _running, _running_lock = 0, threading.Lock()
    for job in list(_unfinished):
        if not job._finished.is_set():
            job._lock, job._finished = threading.Lock(), threading.Event()
            job._error = TpshardError(f"{job.path}: its hash was begun before this process forked; hash it again here")
            job._finished.set()


os.register_at_fork(after_in_child=_forget_the_parents)


def _submit(job: FileHash) -> None:
    with _workers_lock:
        _unfinished.add(job)
    _jobs.put(job)
    with _workers_lock:
        if len(_workers) < max(1, (os.cpu_count() or 1) - 1):
            worker = threading.Thread(target=_work, daemon=True, name="tpshard-sha256")
            _workers.append(worker)
            worker.start()


def _work() -> None:
    while True:
        _jobs.get().run()


def _identity(path: Path) -> Identity | None:
    """The identity of path's file (links followed) if it is a regular one; None for anything else, or
    nothing."""
    try:
        return _identity_of(os.stat(path))
    except (OSError, ValueError):
        return None


def _identity_of(st: os.stat_result) -> Identity | None:
    """(device, inode, size, modification time, change time) of a regular file, None for anything else:
    the change time is the kernel's own, which no one sets (a modification time can be set back)."""
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def start(path: Path) -> None:
    """Begin hashing path's file for a later take(): regular files only (anything else is left for the
    command's own checks to report)."""
    identity = _identity(path)
    with _started_lock:
        if identity is not None and identity not in _started:
            _started[identity] = FileHash(path, identity)


def take(path: Path) -> FileHash:
    """The hash of path's file: the one start() began for this very file (its identity: not changed
    since), else one begun now."""
    identity = _identity(path)
    with _started_lock:
        early = _started.pop(identity, None) if identity is not None else None
    return early or FileHash(path, identity)
