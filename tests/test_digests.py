"""sha256 of files on background workers (files/digests.py): the digests are hashlib's, however the file
is read; a hash begun early is taken up only for the very file it was begun for."""

import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tpshard.errors import TpshardError
from tpshard.files import digests
from tpshard.files.manifest_file import MANIFEST, MAX_MANIFEST_BYTES, start_hashing_rank_files


def test_a_files_sha256_is_hashlibs(tmp_path: Path) -> None:
    """Empty, under a page, across read buffers. Progress gets every byte once."""
    for size in (0, 1, 4097, digests.READ_BYTES, digests.READ_BYTES + 5, 3 * digests.READ_BYTES + 5):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        done: list[int] = []
        assert digests.sha256_file(tmp_path / "f", done.append) == hashlib.sha256(data).hexdigest()
        assert sum(done) == size


def cut_short_once_read(path: Path) -> Callable[[int], None]:
    """A progress that cuts path's file to half its size the first time it is called."""
    size = path.stat().st_size

    def cut(_: int) -> None:
        if path.stat().st_size == size:
            os.truncate(path, size // 2)

    return cut


def test_a_file_cut_short_while_hashed_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated between two reads: the file changed, said in one line, never a digest of part of it."""
    monkeypatch.setattr(digests, "READ_BYTES", 4096)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(10 * 4096))
    with pytest.raises(TpshardError, match="changed while it was being hashed") as failed:
        digests.sha256_file(path, cut_short_once_read(path))
    assert str(failed.value).startswith(f"{path}: ") and "\n" not in str(failed.value)


def test_the_workers_outlive_every_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file cut short while a worker hashes it, or a failure of any other kind, more of them than
    there are workers: each digest() raises one line, and a hash begun after still ends."""
    monkeypatch.setattr(digests, "READ_BYTES", 4096)
    real = digests._hash

    def cut_short(path: Path, expected: digests.Identity | None, progress: object) -> str:
        return real(path, expected, cut_short_once_read(path))

    def bug(*_: object) -> str:
        raise KeyError("a bug")

    failures = []
    for i in range(2 * (os.cpu_count() or 1) + 1):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(10 * 4096))
        monkeypatch.setattr(digests, "_hash", cut_short if i % 2 else bug)
        message = "changed while it was being hashed" if i % 2 else "cannot hash it .KeyError"
        failures.append((digests.take(path), message))
        assert wait(failures[-1][0])  # before the next _hash is patched in
    monkeypatch.setattr(digests, "_hash", real)
    for digest, message in failures:
        with pytest.raises(TpshardError, match=message):
            digest.digest()
    (tmp_path / "good").write_bytes(b"good")
    good = digests.take(tmp_path / "good")
    assert wait(good) and good.digest() == hashlib.sha256(b"good").hexdigest()


def wait(digest: digests.FileHash, timeout: float = 30) -> bool:
    """Whether digest's hash ended within timeout (digest() would wait for ever on a dead worker)."""
    return digest._finished.wait(timeout)


def test_a_file_changed_since_it_was_hashed_fails_its_digest(tmp_path: Path) -> None:
    """Its modification time put back, its size the same: its change time, which no one sets, moved."""
    path = tmp_path / "f"
    path.write_bytes(b"one")
    digest = digests.take(path)
    assert digest.digest() == hashlib.sha256(b"one").hexdigest()
    before = path.stat()
    time.sleep(0.05)
    path.write_bytes(b"two")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(TpshardError, match="changed since it was hashed"):
        digest.digest()


def test_an_early_hash_is_taken_for_the_same_file_only(tmp_path: Path) -> None:
    """take() finds what start() began while the file is unchanged; once it changed (its size, or its
    contents with the modification time put back), a hash of it as it is now. A missing file, or one
    that is not a regular file, is not hashed early; taking it gives the error reading it gives."""
    path = tmp_path / "f"
    path.write_bytes(b"one")
    digests.start(path)
    early = digests.take(path)
    assert early.digest() == hashlib.sha256(b"one").hexdigest()
    digests.start(path)
    time.sleep(0.01)
    path.write_bytes(b"three")
    assert digests.take(path).digest() == hashlib.sha256(b"three").hexdigest()
    digests.start(path)
    before = path.stat()
    assert wait(digests.take(path))  # hashed as "three": taken, so the next start() begins anew
    digests.start(path)
    time.sleep(0.05)
    path.write_bytes(b"eerht")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert digests.take(path).digest() == hashlib.sha256(b"eerht").hexdigest()
    digests.start(tmp_path)  # a directory: nothing begun
    digests.start(tmp_path / "missing")
    with pytest.raises(OSError):
        digests.take(tmp_path / "missing").digest()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        digests.take(tmp_path / "fifo").digest()  # refused, not read: a reader would block


def test_progress_attached_late_gets_every_byte(tmp_path: Path) -> None:
    data = os.urandom(5 * digests.READ_BYTES + 3)
    (tmp_path / "f").write_bytes(data)
    digest = digests.take(tmp_path / "f")
    digest.digest()  # all hashed before anyone listens
    done: list[int] = []
    digest.attach(done.append)
    assert sum(done) == len(data)


def test_a_forked_child_hashes_with_workers_of_its_own(tmp_path: Path) -> None:
    """The parent's workers do not come along into a child: a hash taken there still ends."""
    (tmp_path / "f").write_bytes(b"parent")
    digests.take(tmp_path / "f").digest()  # the parent's workers started
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a child that hangs dies instead
        ok = digests.take(tmp_path / "f").digest() == hashlib.sha256(b"parent").hexdigest()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_hash_the_parent_had_not_finished_fails_in_a_forked_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its worker stayed behind: in the child, digest() says so in one line instead of waiting forever,
    and the GIL's switch interval is what it was before the hash began; the parent's own hash still ends."""
    (tmp_path / "f").write_bytes(b"slow")
    release = threading.Event()
    real_hash = digests._hash

    def held(path: Path, expected: digests.Identity | None, progress: digests.Progress | None) -> str:
        release.wait(10)
        return real_hash(path, expected, progress)

    monkeypatch.setattr(digests, "_hash", held)
    interval = sys.getswitchinterval()
    pending = digests.take(tmp_path / "f")
    deadline = time.monotonic() + 10
    while not digests._running and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a child that hangs dies instead
        if sys.getswitchinterval() != interval:  # the parent's quick handover, for a hash not running here
            os._exit(3)
        try:
            pending.digest()
            os._exit(2)
        except TpshardError as e:
            os._exit(0 if "before this process forked" in str(e) else 1)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pending.digest() == hashlib.sha256(b"slow").hexdigest()


def test_rank_files_are_hashed_early_under_the_names_a_manifest_may_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain name of the set's own folder only (never a path, '..', the manifest, a non-string); a
    manifest that is damaged, too large or not a regular file (a FIFO would block a reader) begins none."""
    started: list[Path] = []
    monkeypatch.setattr(digests, "start", started.append)
    shards = tmp_path / "shards"
    shards.mkdir()
    entries = ["rank0-of-2.safetensors", "../outside", "manifest.json", 5, "", "rank1-of-2.safetensors"]
    (shards / MANIFEST).write_text(json.dumps({"files": [{"file": name} for name in entries]}))
    start_hashing_rank_files(shards)
    assert started == [shards / "rank0-of-2.safetensors", shards / "rank1-of-2.safetensors"]
    started.clear()
    for damage in ("not json", "fifo", "too large", "no files"):
        (shards / MANIFEST).unlink()
        if damage == "fifo":
            os.mkfifo(shards / MANIFEST)
        elif damage == "too large":
            with open(shards / MANIFEST, "wb") as f:
                f.truncate(MAX_MANIFEST_BYTES + 1)
        else:
            (shards / MANIFEST).write_text("{" if damage == "not json" else "{}")
        start_hashing_rank_files(shards)
    assert started == []


def test_the_gil_is_handed_over_quickly_while_a_hash_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch interval is at most SWITCH_SECONDS while any hash runs (two here, ending one after the
    other), and what it was before once the last has ended, failed or not."""
    deadline = time.monotonic() + 30
    while digests._running and time.monotonic() < deadline:  # an earlier test's hash, still running
        time.sleep(0.01)
    before = 0.004
    monkeypatch.setattr(digests.sys, "getswitchinterval", lambda: before)  # the interval set before, whatever
    intervals: list[float] = []
    monkeypatch.setattr(digests.sys, "setswitchinterval", intervals.append)
    release = [threading.Event(), threading.Event()]
    real_hash = digests._hash

    def held(path: Path, expected: digests.Identity | None, progress: digests.Progress | None) -> str:
        release[path.name == "b"].wait(10)
        if path.name == "b":
            raise OSError("unreadable")
        return real_hash(path, expected, progress)

    monkeypatch.setattr(digests, "_hash", held)
    monkeypatch.setattr(digests.os, "cpu_count", lambda: 4)  # two workers, whatever this machine has
    for name in "ab":
        (tmp_path / name).write_bytes(name.encode())
    first, second = digests.take(tmp_path / "a"), digests.take(tmp_path / "b")
    deadline = time.monotonic() + 10
    while digests._running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert intervals == [digests.SWITCH_SECONDS]  # set once, when the first began
    release[0].set()
    assert wait(first) and first.digest() == hashlib.sha256(b"a").hexdigest()
    assert intervals == [digests.SWITCH_SECONDS]  # the other still runs
    release[1].set()
    assert wait(second)
    deadline = time.monotonic() + 10
    while len(intervals) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert intervals == [digests.SWITCH_SECONDS, before]
