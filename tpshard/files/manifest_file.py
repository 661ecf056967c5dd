"""A shard set's manifest.json as a file: its name, the bound on its size, its JSON read whole (checked
by shardset.parse_manifest), the names it may give a file of the set, and the hashes of the rank files it
names begun early. No torch: the CLI reads it while torch is still to be imported."""

import json
from pathlib import Path

from tpshard.errors import TpshardError
from tpshard.files import digests
from tpshard.files.atomic import file_status

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a 1000-layer model's manifest is about 1 MB


def read_manifest(directory: Path) -> object:
    """The JSON of directory's manifest, unchecked; one TpshardError line when there is none, or it is
    not a regular file, too large, unreadable or not JSON."""
    path = Path(directory) / MANIFEST
    size, problem = file_status(path)
    if problem in ("missing", "a directory"):
        raise TpshardError(f"{directory}: no {MANIFEST}; is this the output of tpshard split?")
    if problem:
        raise TpshardError(f"{path}: the manifest is {problem}")
    assert size is not None
    if size > MAX_MANIFEST_BYTES:  # read whole, so bounded first
        raise TpshardError(f"{path}: {size:,} bytes, too large for a manifest; it is damaged")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise TpshardError(f"{path}: not valid JSON ({str(e)[:200]}); the manifest is damaged") from None
    except OSError as e:
        raise TpshardError(f"{path}: cannot read ({e.strerror})") from None


def plain_name(name: object) -> bool:
    """A file name in the shard directory itself: no path, no '..', no NUL."""
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..") and "\0" not in name


def rank_file_name_ok(name: object) -> bool:
    """Whether a manifest may name a rank file so: a plain name, not the manifest's own."""
    return plain_name(name) and name != MANIFEST


def start_hashing_rank_files(directory: Path) -> None:
    """Begin hashing the rank files that directory's manifest names (digests.start), before the manifest
    is checked: the names it may give them only. Anything unexpected is left for ShardSet.open to say."""
    try:
        names = [entry["file"] for entry in read_manifest(directory)["files"]]  # type: ignore[index]
    except (TpshardError, KeyError, TypeError):
        return
    for name in names:
        if rank_file_name_ok(name):
            digests.start(Path(directory) / name)
