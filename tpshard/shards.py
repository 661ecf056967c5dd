"""The shard set on disk: one safetensors file per rank plus manifest.json, and the three operations
that write or read it whole: split, merge and reshard. All three follow plan.py's rules, tensor by
tensor, so no step holds the model twice.

    OUT_DIR/
      manifest.json               format, tp size, model args, every tensor's rule and dense shape,
                                  every file's size and sha256, and where the shards came from
      rank0-of-2.safetensors      rank 0's pieces; its own metadata says rank, tp size, format version
      rank1-of-2.safetensors
      meta.pkl | *.tiktoken       the tokenizer, so that a shard set is self-contained
"""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tpshard import plan
from tpshard.checkpoint import (
    MIN_TENSORS_PER_LAYER,
    Checkpoint,
    bookkeeping,
    config_from_model_args,
    hold,
    remove_orphans,
    under_umask,
    write_failure,
)
from tpshard.errors import TpshardError
from tpshard.model import GPTConfig, check_tp

FORMAT = "tpshard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK = 8 << 20
MAX_MANIFEST_BYTES = 64 << 20  # a 1000-layer model's manifest is about 1 MB

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Progress = Callable[[int], None]  # called with the number of bytes just done


def rank_file_name(rank: int, tp_size: int) -> str:
    return f"rank{rank}-of-{tp_size}.safetensors"


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


# --- writing ------------------------------------------------------------------------------------


def write_safetensors(
    path: Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
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
        entry = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
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


def spare_inputs(out: Path, inputs: list[Path]) -> None:
    """--force replaces OUT whole: refuse when OUT is one of the inputs, or a directory that holds one."""
    target = Path(out).resolve()
    for path in inputs:
        resolved = Path(path).resolve()
        if resolved == target or target in resolved.parents:
            raise TpshardError(f"{out}: is or holds the input {path}; write the output elsewhere")


@contextmanager
def atomic_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir; rename it to out_dir only when the body succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise TpshardError(f"{out_dir}: already exists; choose another output or pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise TpshardError(f"{out_dir}: exists and is not a directory")
    parent = out_dir.parent
    if not parent.is_dir():
        raise TpshardError(f"{parent}: output's parent directory does not exist")
    remove_orphans(out_dir, ".partial")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
        lock = os.open(tmp, os.O_RDONLY)
        hold(lock)  # until the rename: a run killed before it leaves an orphan that a later run removes
        tmp.chmod(under_umask(0o777))  # mkdtemp's 0700 is for the temporary name only
    except OSError as e:
        raise TpshardError(f"{parent}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
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


@dataclass
class Manifest:
    tp_size: int
    config: GPTConfig
    dtype: torch.dtype
    tensors: dict[str, dict]  # name -> {"rule", "shape"}
    files: list[dict]  # per rank: {"rank", "file", "bytes", "sha256"}
    source: dict
    tokenizer: str | None = None
    format_version: int = FORMAT_VERSION
    vocab_parallel: bool = False

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "tp_size": self.tp_size,
            "model_args": asdict(self.config),  # everything, activation included
            "dtype": DTYPE_NAMES[self.dtype],
            "vocab_parallel": self.vocab_parallel,
            "vocab_padding": self.vocab_padding,
            "tied": plan.TIED,
            "tensors": self.tensors,
            "files": self.files,
            "tokenizer": self.tokenizer,
            "source": self.source,
        }

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Every rank file's tensors: name, dtype and piece shape (the same for every rank)."""
        return [
            (name, self.dtype, plan.piece_shape(name, tuple(t["shape"]), self.tp_size, self.vocab_parallel))
            for name, t in self.tensors.items()
        ]

    @property
    def vocab_padding(self) -> int:
        """Zero rows appended to a vocab-parallel embedding (dropped again on merge)."""
        if not self.vocab_parallel:
            return 0
        return plan.vocab_slice(self.config.vocab_size, self.tp_size) * self.tp_size - self.config.vocab_size

    def unshard(self, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        return plan.unshard(name, pieces, self.vocab_parallel, self.config.vocab_size)

    def dense_bytes(self) -> int:
        return sum(self.dtype.itemsize * int(torch.Size(t["shape"]).numel()) for t in self.tensors.values())


def tensor_table(config: GPTConfig, vocab_parallel: bool = False) -> dict[str, dict]:
    shapes = plan.dense_shapes(config)
    return {
        name: {"rule": plan.rule_for(name, vocab_parallel).value, "shape": list(shape)}
        for name, shape in shapes.items()
    }


def write_shard_set(
    out_dir: Path,
    manifest: Manifest,
    piece: Callable[[str, int], torch.Tensor],
    describe_source: Callable[[], dict],
    *,
    force: bool = False,
    tokenizer_file: Path | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Write every rank's file from piece(name, rank), then the manifest, atomically.
    describe_source runs last, so that hashing the source can overlap the writing."""
    check_tp(manifest.config, manifest.tp_size)
    with atomic_directory(out_dir, force) as tmp:
        manifest.files = []
        for rank in range(manifest.tp_size):
            name = rank_file_name(rank, manifest.tp_size)
            metadata = {
                "format": FORMAT,
                "format_version": str(FORMAT_VERSION),
                "rank": str(rank),
                "tp_size": str(manifest.tp_size),
            }
            produce = lambda n, r=rank: piece(n, r)  # noqa: E731
            digest = write_safetensors(tmp / name, manifest.layout(), produce, metadata, progress)
            manifest.files.append({"rank": rank, "file": name, "bytes": (tmp / name).stat().st_size, "sha256": digest})
        manifest.source = describe_source()
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / tokenizer_file.name)
            manifest.tokenizer = tokenizer_file.name
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def split_checkpoint(
    checkpoint: Checkpoint,
    tp_size: int,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    vocab_parallel: bool = False,
    force: bool = False,
    tokenizer_file: Path | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Split a dense checkpoint into tp_size rank files (optimizer state is left out)."""
    check_tp(checkpoint.config, tp_size)
    spare_inputs(out_dir, [checkpoint.path, *([tokenizer_file] if tokenizer_file else [])])
    dtype = dtype or checkpoint.dtype
    source_hash = BackgroundHash(checkpoint.path)
    manifest = Manifest(
        tp_size=tp_size,
        config=checkpoint.config,
        dtype=dtype,
        tensors=tensor_table(checkpoint.config, vocab_parallel),
        files=[],
        source={},
        vocab_parallel=vocab_parallel,
    )

    def piece(name: str, rank: int) -> torch.Tensor:
        return plan.shard(name, checkpoint.state_dict[name], rank, tp_size, vocab_parallel).to(dtype)

    def describe_source() -> dict:
        return {
            "file": checkpoint.path.name,
            "sha256": source_hash.get(),
            "iter_num": checkpoint.iter_num,
            "best_val_loss": checkpoint.best_val_loss,
            "config": checkpoint.train_config,
            "optimizer_left_out": checkpoint.has_optimizer,
            "source_dtype": DTYPE_NAMES.get(checkpoint.dtype, str(checkpoint.dtype)),
        }

    return write_shard_set(
        out_dir, manifest, piece, describe_source, force=force, tokenizer_file=tokenizer_file, progress=progress
    )


# --- reading ------------------------------------------------------------------------------------


def _require(cond: bool, where: Path, what: str) -> None:
    if not cond:
        what = what if len(what) <= 300 else what[:300] + "..."  # a forged value can be megabytes long
        raise TpshardError(f"{where}: invalid manifest: {what}; re-create the shard set with tpshard split")


def _plain_name(name: object) -> bool:
    """A file name in the shard directory itself: no path, no '..'."""
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")


def parse_manifest(data: object, where: Path) -> Manifest:
    """Check a manifest's structure and types before trusting any of it."""
    _require(isinstance(data, dict), where, "not a JSON object")
    assert isinstance(data, dict)
    _require(data.get("format") == FORMAT, where, f"format is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not True, which equals 1
        raise TpshardError(
            f"{where}: shard format version {version!r} is not supported (this tpshard reads version "
            f"{FORMAT_VERSION}); use a matching tpshard or re-split"
        )
    for key, kind in (("tp_size", int), ("model_args", dict), ("dtype", str), ("tensors", dict), ("files", list)):
        _require(isinstance(data.get(key), kind), where, f"'{key}' missing or not a {kind.__name__}")
    tp_size = data["tp_size"]
    _require(not isinstance(tp_size, bool) and tp_size >= 1, where, f"tp_size {tp_size!r}")
    _require(data["dtype"] in DTYPES, where, f"dtype {data['dtype']!r} unknown")
    config = config_from_model_args(data["model_args"], where)
    divides = config.n_head % tp_size == 0 and 4 * config.n_embd % tp_size == 0
    _require(divides, where, f"tp_size {tp_size} does not divide n_head={config.n_head} and 4*n_embd")
    vocab_parallel = data.get("vocab_parallel", False)
    _require(isinstance(vocab_parallel, bool), where, f"vocab_parallel {vocab_parallel!r}")
    # before the table is built: a forged n_layer=10**9 would make it a billion entries
    enough = len(data["tensors"]) >= MIN_TENSORS_PER_LAYER * config.n_layer
    _require(enough, where, f"n_layer={config.n_layer} but {len(data['tensors'])} tensors listed")
    expected = tensor_table(config, vocab_parallel)
    _require(data["tensors"] == expected, where, "tensor table disagrees with model_args and the split rules")
    files = data["files"]
    _require(len(files) == tp_size, where, f"{len(files)} files listed for tp_size {tp_size}")
    for rank, entry in enumerate(files):
        _require(isinstance(entry, dict), where, f"files[{rank}] is not an object")
        _require(entry.get("rank") == rank, where, f"files[{rank}] has rank {entry.get('rank')!r}")
        name = entry.get("file")
        _require(_plain_name(name), where, f"files[{rank}] name {name!r}")
        size, digest = entry.get("bytes"), entry.get("sha256")
        sized = isinstance(size, int) and not isinstance(size, bool) and size > 8
        _require(sized, where, f"files[{rank}] bytes {size!r}")
        _require(isinstance(digest, str) and len(digest) == 64, where, f"files[{rank}] sha256 {digest!r}")
    names = [entry["file"] for entry in files]
    _require(len(set(names)) == len(names), where, "a file is listed for two ranks")
    tokenizer = data.get("tokenizer")
    _require(tokenizer is None or _plain_name(tokenizer), where, f"tokenizer {tokenizer!r}")
    source = data.get("source", {})
    _require(isinstance(source, dict), where, "source is not an object")
    bookkeeping(source, where)  # what merge writes back into the checkpoint: the same checks as a ckpt.pt's
    return Manifest(tp_size, config, DTYPES[data["dtype"]], expected, files, source, tokenizer, version, vocab_parallel)


@dataclass
class ShardSet:
    directory: Path
    manifest: Manifest

    @classmethod
    def open(cls, directory: str | Path) -> "ShardSet":
        directory = Path(directory)
        if not directory.exists():
            raise TpshardError(f"{directory}: no such directory")
        if not directory.is_dir():
            raise TpshardError(f"{directory}: is a file, expected a shard directory (the output of tpshard split)")
        path = directory / MANIFEST
        if not path.is_file():
            raise TpshardError(f"{directory}: no {MANIFEST}; is this the output of tpshard split?")
        if path.stat().st_size > MAX_MANIFEST_BYTES:  # read whole, so bounded first
            raise TpshardError(f"{path}: {path.stat().st_size:,} bytes, too large for a manifest; it is damaged")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise TpshardError(f"{path}: not valid JSON ({str(e)[:200]}); the manifest is damaged") from None
        except OSError as e:
            raise TpshardError(f"{path}: cannot read ({e.strerror})") from None
        return cls(directory, parse_manifest(data, path))

    @property
    def tp_size(self) -> int:
        return self.manifest.tp_size

    def rank_path(self, rank: int) -> Path:
        return self.directory / self.manifest.files[rank]["file"]

    @property
    def tokenizer_path(self) -> Path | None:
        return self.directory / self.manifest.tokenizer if self.manifest.tokenizer else None

    def check_file(self, rank: int, *, checksum: bool = True, progress: Progress | None = None) -> None:
        """Raise TpshardError unless rank's file is present, of its recorded size (and sha256), and its
        safetensors header holds exactly the expected tensors and says it is this rank of this set."""
        entry, path = self.manifest.files[rank], self.rank_path(rank)
        if not path.is_file():
            raise TpshardError(f"{path}: rank {rank}'s shard file is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise TpshardError(f"{path}: {size} bytes, the manifest records {entry['bytes']} (truncated or replaced)")
        if checksum and sha256_file(path, progress) != entry["sha256"]:
            raise TpshardError(f"{path}: sha256 differs from the manifest: the file is corrupt or was modified")
        with open_rank_file(path) as f:
            self._check_header(f, path, rank)

    def _check_header(self, f, path: Path, rank: int) -> None:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("tp_size") != str(self.tp_size):
            raise TpshardError(f"{path}: not a rank file of this {self.tp_size}-way shard set (metadata {meta})")
        if meta.get("rank") != str(rank):
            raise TpshardError(f"{path}: holds rank {meta.get('rank')}, expected rank {rank} (files swapped?)")
        layout = {name: (dtype, shape) for name, dtype, shape in self.manifest.layout()}
        if set(f.keys()) != set(layout):
            raise TpshardError(f"{path}: its tensors differ from the manifest's")
        for name, (dtype, shape) in layout.items():
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != shape or sl.get_dtype() != SAFETENSORS_DTYPES[dtype]:
                raise TpshardError(f"{path}: {name} is {sl.get_dtype()} {sl.get_shape()}, manifest says {shape}")

    def load_rank(self, rank: int, *, checksum: bool = True) -> dict[str, torch.Tensor]:
        """Rank's pieces, memory-mapped copy-on-write: only this rank's file is read."""
        self.check_file(rank, checksum=checksum)
        with open_rank_file(self.rank_path(rank)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)

    def load_pieces(self, ranks: list[int], *, checksum: bool = True) -> dict[str, list[torch.Tensor]]:
        """Every tensor's pieces of the given ranks, in rank order."""
        loaded = [self.load_rank(r, checksum=checksum) for r in ranks]
        return {name: [rank[name] for rank in loaded] for name in self.manifest.tensors}


@contextmanager
def open_rank_file(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise TpshardError(f"{path}: not a readable safetensors file ({e})") from None


def merge_shards(shards: ShardSet, *, checksum: bool = True, progress: Progress | None = None) -> Checkpoint:
    """The dense checkpoint back from every rank's file (each checked against its sha256 first, unless
    checksum=False: the caller just did)."""
    for rank in range(shards.tp_size):
        shards.check_file(rank, checksum=checksum, progress=progress)
    pieces = shards.load_pieces(list(range(shards.tp_size)), checksum=False)
    state = {name: shards.manifest.unshard(name, ranks).contiguous() for name, ranks in pieces.items()}
    for tied, source in plan.TIED.items():
        state[tied] = state[source]
    return Checkpoint(
        path=shards.directory,
        config=shards.manifest.config,
        state_dict=state,
        **bookkeeping(shards.manifest.source, shards.directory),
    )


def reshard(
    shards: ShardSet, tp_size: int, out_dir: Path, *, force: bool = False, progress: Progress | None = None
) -> Manifest:
    """N -> M directly: each tensor is reassembled from the old pieces and cut for the new ranks,
    one tensor at a time, without a dense checkpoint on disk."""
    check_tp(shards.manifest.config, tp_size)
    spare_inputs(out_dir, [shards.directory])
    tokenizer = shards.tokenizer_path
    if tokenizer is not None and not tokenizer.is_file():  # copied last: say so before the long write
        raise TpshardError(f"{tokenizer}: the manifest's tokenizer file is missing; restore it or re-split")
    for rank in range(shards.tp_size):
        shards.check_file(rank)
    old = shards.load_pieces(list(range(shards.tp_size)), checksum=False)
    m = shards.manifest
    manifest = Manifest(tp_size, m.config, m.dtype, m.tensors, [], {}, vocab_parallel=m.vocab_parallel)
    return write_shard_set(
        out_dir,
        manifest,
        lambda name, rank: plan.shard(name, m.unshard(name, old[name]), rank, tp_size, m.vocab_parallel),
        lambda: {**m.source, "resharded_from_tp": m.tp_size},
        force=force,
        tokenizer_file=shards.tokenizer_path,
        progress=progress,
    )
