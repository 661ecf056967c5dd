"""sha256 of whole files, hashed on background threads (file reads and hashlib release the GIL): started as
soon as a command knows which files it reads, before torch is imported (a second of one core), and taken
up later by the code that needs the digest. Imports no torch, so that the CLI can start them first."""

import errno
import hashlib
import json
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

MANIFEST = "manifest.json"  # a shard set's: it names the rank files
MAX_MANIFEST_BYTES = 64 << 20  # a 1000-layer model's manifest is about 1 MB
READ_BYTES = 1 << 20  # a read buffer that stays in the core's cache
# of the file mapped, and hashed in one call, at a time: hashlib lets go of the GIL while it hashes, and
# takes it again after; a call of a few milliseconds is not held up much by a thread that keeps the GIL
# for several (torch's import, say), and the pages mapped at a time stay few
WINDOW_BYTES = 4 << 20
Progress = Callable[[int], None]  # called with the number of bytes just done


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The file's sha256, hashed from a memory map of it a window at a time (no copy of the bytes out of
    the page cache, as read() makes); read where the file cannot be mapped."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        if not _hash_mapped(f, digest, progress):
            buffer = memoryview(bytearray(READ_BYTES))
            while size := f.readinto(buffer):
                _step(digest, buffer[:size], progress)
    return digest.hexdigest()


def _hash_mapped(f: BinaryIO, digest: "hashlib._Hash", progress: Progress | None) -> bool:
    """Hash the open file from memory maps of WINDOW_BYTES; False, nothing hashed, if it cannot be mapped."""
    size = os.fstat(f.fileno()).st_size
    for start in range(0, size, WINDOW_BYTES):
        try:
            window = mmap.mmap(f.fileno(), min(WINDOW_BYTES, size - start), offset=start, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            if start:
                raise
            return False
        with window, memoryview(window) as view:
            _step(digest, view, progress)
    return True


def _step(digest: "hashlib._Hash", data: memoryview, progress: Progress | None) -> None:
    digest.update(data)
    if progress:
        progress(len(data))


class FileHash:
    """The sha256 of one file, computed by a background worker (see _submit). Progress attached at any
    time gets the bytes hashed so far at once, then the rest as they are hashed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._hashed = 0
        self._progress: Progress | None = None
        self._digest: str | None = None
        self._error: OSError | None = None
        self._finished = threading.Event()
        _submit(self)

    def run(self) -> None:
        try:
            if _identity(self.path) is None:  # a FIFO would block the worker, a device never end
                os.stat(self.path)  # missing: its own error
                raise OSError(errno.EINVAL, "not a regular file", str(self.path))
            self._digest = sha256_file(self.path, self._advance)
        except OSError as e:
            self._error = e
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
        """The hex digest, once hashed; the OSError that reading the file raised, if one did."""
        self._finished.wait()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


# One worker per core, daemon threads: a failed or interrupted command never waits for a hash to end.
_jobs: "queue.SimpleQueue[FileHash]" = queue.SimpleQueue()
_workers: list[threading.Thread] = []
_workers_lock = threading.Lock()
_started: dict[tuple[int, ...], FileHash] = {}  # by the file's identity (see _identity)
_started_lock = threading.Lock()


def _forget_the_parents() -> None:
    """In a forked child: the parent's workers did not come along (and a lock may have been held)."""
    global _jobs, _workers, _workers_lock, _started, _started_lock
    _jobs, _workers, _workers_lock = queue.SimpleQueue(), [], threading.Lock()
    _started, _started_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_the_parents)


def _submit(job: FileHash) -> None:
    _jobs.put(job)
    with _workers_lock:
        if len(_workers) < (os.cpu_count() or 1):
            worker = threading.Thread(target=_work, daemon=True, name="tpshard-sha256")
            _workers.append(worker)
            worker.start()


def _work() -> None:
    while True:
        _jobs.get().run()


def _identity(path: Path) -> tuple[int, ...] | None:
    """(device, inode, size, modification time) of a regular file (links followed); None for anything
    else, or nothing: a FIFO would block a reader, a device never end."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def start(path: Path) -> None:
    """Begin hashing path's file for a later take(): regular files only (anything else is left for the
    command's own checks to report)."""
    identity = _identity(path)
    with _started_lock:
        if identity is not None and identity not in _started:
            _started[identity] = FileHash(path)


def take(path: Path) -> FileHash:
    """The hash of path's file: the one start() began for this very file (the same inode, size and
    modification time: not changed since), else one begun now."""
    identity = _identity(path)
    with _started_lock:
        early = _started.pop(identity, None) if identity is not None else None
    return early or FileHash(path)


def start_rank_files(shard_dir: Path) -> None:
    """Begin hashing the rank files that a shard set's manifest names, before the manifest is checked
    (which needs torch): plain names in shard_dir, regular files only. Anything unexpected is skipped,
    for ShardSet.open to report."""
    manifest = Path(shard_dir) / MANIFEST
    try:
        if _identity(manifest) is None or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return
        names = [entry["file"] for entry in json.loads(manifest.read_text(encoding="utf-8"))["files"]]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # ValueError: JSON, or text that is not UTF-8
        return
    for name in names:
        if isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..", MANIFEST):
            start(Path(shard_dir) / name)
