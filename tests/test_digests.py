"""sha256 of files on background workers (files/digests.py): the digests are hashlib's, however the file
is read; a hash begun early is taken up only for the very file it was begun for."""

import hashlib
import mmap
import os
import signal
import time
from pathlib import Path

import pytest

from tpshard.files import digests


@pytest.mark.parametrize("mapped", [True, False])
def test_a_files_sha256_is_hashlibs(mapped: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty, under a page, across windows, across read buffers; mapped, or read where the file cannot
    be mapped. Progress gets every byte once."""
    monkeypatch.setattr(digests, "WINDOW_BYTES", 3 * mmap.PAGESIZE)
    if not mapped:

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError("no mmap here")

        monkeypatch.setattr(mmap, "mmap", refuse)
    for size in (0, 1, 4097, 3 * mmap.PAGESIZE, digests.READ_BYTES + 5, 7 * digests.READ_BYTES + 5):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        done: list[int] = []
        assert digests.sha256_file(tmp_path / "f", done.append) == hashlib.sha256(data).hexdigest()
        assert sum(done) == size


def test_an_early_hash_is_taken_for_the_same_file_only(tmp_path: Path) -> None:
    """take() finds what start() began while the file is unchanged; once it changed (its size or
    modification time), a hash of it as it is now. A missing file, or one that is not a regular file,
    is not hashed early; taking it gives the error reading it gives."""
    path = tmp_path / "f"
    path.write_bytes(b"one")
    digests.start(path)
    early = digests.take(path)
    assert early.digest() == hashlib.sha256(b"one").hexdigest()
    digests.start(path)
    time.sleep(0.01)
    path.write_bytes(b"three")
    assert digests.take(path).digest() == hashlib.sha256(b"three").hexdigest()
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
