"""All-or-nothing outputs: a file or directory appears under its name only when complete, a killed
run leaves at most a locked temporary that a later run removes, and no output replaces an input."""

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from tpshard.errors import TpshardError, first_line

ORPHAN_AGE_S = 60  # an unlocked temporary output untouched this long was left by a killed run


def atomic_write(path: Path, write: Callable[[Path], None], before_rename: Callable[[], None] | None = None) -> None:
    """Run write(tmp_path), then rename over path: a crash leaves no half-written file under path's name.
    before_rename, if given, runs just before: what it raises leaves path unchanged too."""
    path = Path(path)
    if path.is_dir():
        raise TpshardError(f"{path}: is a directory, expected a file name for the output")
    remove_orphans(path, ".tmp")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no such directory, read-only, ...
        raise TpshardError(f"{path.parent}: cannot write here ({e.strerror})") from None
    try:
        lock_while_writing(fd)
        os.fchmod(fd, under_umask(0o666))  # mkstemp's 0600 is for the temporary name only
        write(Path(tmp))
        os.fsync(fd)  # the data on disk before the name points at it
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # a full disk, say: one line, not a traceback (torch.save and safetensors raise their own types)
        if isinstance(e, OSError | RuntimeError | SafetensorError):
            raise TpshardError(f"{path}: writing failed ({write_failure(e)}); {path} is unchanged") from None
        raise
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(
    out_dir: Path, force: bool, before_rename: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir; rename it to out_dir only when the body succeeds (and
    before_rename, if given, which runs just before, raises nothing)."""
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not force:  # lexists: a dangling link or a link loop is a name taken too
        raise TpshardError(f"{out_dir}: already exists; choose another output or pass --force to replace it")
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise TpshardError(f"{out_dir}: exists and is not a directory{_link_note(out_dir)}")
    parent = out_dir.parent
    if not parent.is_dir():
        raise TpshardError(f"{parent}: output's parent directory does not exist")
    remove_orphans(out_dir, ".partial")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
        lock = os.open(tmp, os.O_RDONLY)
        lock_while_writing(lock)  # until the rename: a run killed before it leaves an orphan that a later run removes
        tmp.chmod(under_umask(0o777))  # mkdtemp's 0700 is for the temporary name only
    except OSError as e:
        raise TpshardError(f"{parent}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        if before_rename is not None:
            before_rename()
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk, say: one line, not a traceback (safetensors' save_file raises its own type)
        if isinstance(e, OSError | SafetensorError):
            raise TpshardError(f"{out_dir}: writing failed ({write_failure(e)}); {out_dir} is unchanged") from None
        raise
    finally:
        os.close(lock)


def refuse_output_over_inputs(out: Path, inputs: list[Path]) -> None:
    """--force replaces OUT whole: refuse when OUT is one of the inputs, or a directory that holds one,
    symbolic links followed on both sides (a link loop is left as it is: it leads to no input)."""
    target = real_path(out)
    for path in inputs:
        resolved = real_path(path)
        if resolved == target or target in resolved.parents:
            raise TpshardError(f"{out}: is or holds the input {path}; write the output elsewhere")


def input_files(path: Path) -> list[Path]:
    """An input's path, and for a directory (an HF one, a shard set) the files in it, which may be links
    to elsewhere (the hub's cache links each to a blob; a rank file may be one): an output must replace
    none of them."""
    if not path.is_dir():
        return [path]
    try:
        return [path, *path.iterdir()]
    except OSError:
        return [path]


def real_path(path: Path) -> Path:
    """path with every symbolic link followed, as far as they lead. Path.resolve raises RuntimeError on a
    link loop (before Python 3.13); os.path.realpath stops there instead."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise TpshardError(f"{path}: cannot resolve the path ({getattr(e, 'strerror', None) or e})") from None


def _link_note(path: Path) -> str:
    if not path.is_symlink():
        return ""
    _, problem = file_status(path)
    return f" ({problem})" if problem and problem.startswith("a symbolic link") else " (a symbolic link)"


def file_status(path: Path) -> tuple[int | None, str | None]:
    """(size, None) for a regular file (links followed), else (None, what it is instead, worded to follow
    "is"): missing, a symbolic link loop, a directory, ... . Path.is_file() answers False for all of them,
    and a link loop then reads as "missing"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "a symbolic link to nothing" if path.is_symlink() else "missing"
    except NotADirectoryError:
        return None, "missing"
    except OSError as e:
        return None, "a symbolic link loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
    except ValueError:  # a NUL in the name
        return None, "missing"
    if stat.S_ISDIR(st.st_mode):
        return None, "a directory"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    return st.st_size, None


def under_umask(mode: int) -> int:
    """mode as the umask leaves it: what a plain open() or mkdir() would have given the output."""
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return mode & ~umask


def lock_while_writing(fd: int) -> None:
    """Lock a temporary output while this process writes it. The kernel drops the lock when the process
    ends, however it ends (kill -9 included), which is how a later run tells an orphan from a live write."""
    with contextlib.suppress(OSError):  # a file system without locks: orphans stay (no one can lock them)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_orphans(out: Path, suffix: str) -> None:
    """Delete the temporary outputs (.OUT.xxxxxxxx<suffix>, as mkstemp/mkdtemp name them) that killed runs
    left beside out: unlocked and untouched for ORPHAN_AGE_S (a live run locks its own right after creating
    it). Nothing else is touched; a failure to clean is no reason to fail the run."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > ORPHAN_AGE_S:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass  # locked by its writer, or not ours to remove
        finally:
            os.close(fd)


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason, or the first line of torch's or safetensors'."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return f"{first_line(e) or type(e).__name__}; is the disk full?"
