"""The shard set on disk: one safetensors file per rank plus manifest.json, read and checked before
any of it is trusted, and written all or nothing.

    OUT_DIR/
      manifest.json               format, the rank grid, model args, every tensor's rule and dense
                                  shape, every file's grid position, size and sha256, and where the
                                  shards came from
      rank0-of-2.safetensors      rank 0's pieces; its own metadata says rank, tp size, format version
      rank1-of-2.safetensors      (rankR-of-W: W = tp x pp ranks; with stages, the metadata also says
                                  pp size, stage and tp rank, and the manifest each stage's blocks)
      meta.pkl | tokenizer.tiktoken   the tokenizer, so that a shard set is self-contained: always under
                                  one of these two names, whatever the file was called (a char vocabulary
                                  as nanoGPT's sample.py names it, a BPE ranks file), and found through
                                  the manifest's "tokenizer"

Format versions (see the README): version 1 is a set of one pipeline stage. The grid ("grid", and
each file's "stage" and "tp_rank") was added to version 1 as fields that earlier readers ignore; a
version-1 manifest without them is a tp x 1 grid. A set of several stages is version 2 (an earlier
reader would misread it: not every file holds every tensor): it adds "stages", each stage's blocks,
and the last stage's copy of the tied embedding, lm_head.weight, to the tensor table.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tpshard.config import GPTConfig
from tpshard.errors import TpshardError
from tpshard.files.atomic import atomic_directory, file_status
from tpshard.files.checkpoint import MIN_TENSORS_PER_LAYER, config_from_model_args, is_text, training_record
from tpshard.files.digests import FileHash, take
from tpshard.files.manifest_file import MANIFEST, plain_name, rank_file_name_ok, read_manifest
from tpshard.files.tensorfile import (
    DTYPE_NAMES,
    DTYPES,
    SAFETENSORS_CODES,
    Layout,
    Progress,
    open_safetensors,
    read_tensors,
    write_safetensors_files,
)
from tpshard.parallel import plan
from tpshard.parallel.grid import ParallelDims, Stages

FORMAT = "tpshard"
FORMAT_VERSION = 1  # one stage
PIPELINE_FORMAT_VERSION = 2  # several stages
# The names a shipped tokenizer gets (never the user's: a tokenizer called rank0-of-2.safetensors or
# manifest.json would overwrite a file of the set, and one called chars.pkl would not be found again).
CHAR_TOKENIZER = "meta.pkl"  # nanoGPT's char vocabulary, named as sample.py looks for it
BPE_TOKENIZER = "tokenizer.tiktoken"  # a tiktoken ranks file
SHIPPED_TOKENIZERS = (CHAR_TOKENIZER, BPE_TOKENIZER)
# Rank files written side by side (tensorfile.write_safetensors_files), each hashed on a thread of its
# own: one per core, up to 4 (beyond that the one thread that copies the pieces out is the limit).
FILES_AT_ONCE = min(4, os.cpu_count() or 1)


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank{rank}-of-{world_size}.safetensors"


@dataclass
class Manifest:
    grid: ParallelDims
    config: GPTConfig
    dtype: torch.dtype
    tensors: dict[str, dict]  # name -> {"rule", "shape"}
    files: list[dict]  # per rank: {"rank", "stage", "tp_rank", "file", "bytes", "sha256"}
    source: dict
    tokenizer: str | None = None
    format_version: int = FORMAT_VERSION
    vocab_parallel: bool = False
    stages: Stages | None = None  # None: one stage, every block

    def __post_init__(self) -> None:
        self.stages = self.stages or Stages.one(self.config.n_layer)
        self.format_version = PIPELINE_FORMAT_VERSION if self.grid.pp > 1 else self.format_version

    @property
    def tp_size(self) -> int:
        return self.grid.tp

    @property
    def stage_plan(self) -> Stages:
        assert self.stages is not None
        return self.stages

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "tp_size": self.tp_size,
            "grid": {"tp": self.grid.tp, "pp": self.grid.pp},
            "model_args": asdict(self.config),  # everything, activation included
            "dtype": DTYPE_NAMES[self.dtype],
            "vocab_parallel": self.vocab_parallel,
            "vocab_padding": self.vocab_padding,
            "tied": plan.TIED,
            "tensors": self.tensors,
            "files": self.files,
            "tokenizer": self.tokenizer,
            "source": self.source,
        } | ({"stages": self._stages_json()} if self.grid.pp > 1 else {})

    def _stages_json(self) -> list[dict]:
        return [
            {"stage": s, "layers": [blocks.start, blocks.stop], "ranks": self.grid.tp_group(self.grid.rank(s, 0))}
            for s, blocks in ((s, self.stage_plan.blocks(s)) for s in range(self.grid.pp))
        ]

    def stage_tensors(self, stage: int) -> list[str]:
        """The tensors a stage's rank files hold, in the table's order."""
        return [name for name in self.tensors if plan.stage_of(name, self.stage_plan) == stage]

    def layout(self, rank: int = 0) -> Layout:
        """A rank file's tensors: name, dtype and piece shape (the same for every rank of a stage)."""
        stage, _ = self.grid.coordinates(rank)
        shape = lambda name: tuple(self.tensors[name]["shape"])  # noqa: E731
        return [
            (name, self.dtype, plan.piece_shape(name, shape(name), self.tp_size, self.vocab_parallel))
            for name in self.stage_tensors(stage)
        ]

    @property
    def dataset(self) -> object:
        """The training config's dataset, as the source recorded it (where sample.py finds meta.pkl)."""
        return (self.source.get("config") or {}).get("dataset")

    @property
    def vocab_padding(self) -> int:
        """Zero rows appended to a vocab-parallel embedding (dropped again on merge)."""
        if not self.vocab_parallel:
            return 0
        return plan.vocab_slice(self.config.vocab_size, self.tp_size) * self.tp_size - self.config.vocab_size

    def unshard(self, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        return plan.unshard(name, pieces, self.vocab_parallel, self.config.vocab_size)

    def dense_bytes(self, *, tied_twice: bool = False) -> int:
        """The dense model's bytes (the last stage's copy of the tied embedding left out); with
        tied_twice, the tied embedding counted again, as a DCP export stores it (lm_head too)."""
        names = [name for name in self.tensors if name not in plan.TIED]
        names += [source for source in plan.TIED.values() if tied_twice]
        return sum(self.dtype.itemsize * int(torch.Size(self.tensors[name]["shape"]).numel()) for name in names)


def tensor_table(config: GPTConfig, vocab_parallel: bool = False, pp: int = 1) -> dict[str, dict]:
    shapes = plan.stored_shapes(config, pp)
    return {
        name: {"rule": plan.rule_for(name, vocab_parallel).value, "shape": list(shape)}
        for name, shape in shapes.items()
    }


def _metadata(manifest: Manifest, rank: int) -> dict[str, str]:
    """What a rank file's own header says of it."""
    metadata = {
        "format": FORMAT,
        "format_version": str(manifest.format_version),
        "rank": str(rank),
        "tp_size": str(manifest.tp_size),
    }
    if manifest.grid.pp > 1:
        stage, tp_rank = manifest.grid.coordinates(rank)
        metadata |= {"pp_size": str(manifest.grid.pp), "stage": str(stage), "tp_rank": str(tp_rank)}
    return metadata


def write_shard_set(
    out_dir: Path,
    manifest: Manifest,
    piece: Callable[[str, int], torch.Tensor],
    describe_source: Callable[[], dict],
    *,
    force: bool = False,
    tokenizer_file: Path | None = None,
    tokenizer_name: str | None = None,
    progress: Progress | None = None,
    before_rename: Callable[[], None] | None = None,
) -> Manifest:
    """Write every rank's file from piece(name, rank), FILES_AT_ONCE side by side, then the manifest,
    atomically (before_rename, if given, runs last: what it raises leaves out_dir unchanged).
    describe_source runs after the rank files, so that hashing the source can overlap the writing.
    tokenizer_file is copied in as tokenizer_name, one of SHIPPED_TOKENIZERS (the caller knows which
    kind it is)."""
    manifest.grid.check(manifest.config)
    if tokenizer_file is not None and tokenizer_name not in SHIPPED_TOKENIZERS:
        raise ValueError(f"a shipped tokenizer is named one of {SHIPPED_TOKENIZERS}, not {tokenizer_name!r}")
    with atomic_directory(out_dir, force, before_rename) as tmp:
        manifest.files = []
        ranks = list(range(manifest.grid.world_size))
        for first in range(0, len(ranks), FILES_AT_ONCE):
            group = ranks[first : first + FILES_AT_ONCE]
            files = [(tmp / rank_file_name(r, len(ranks)), manifest.layout(r), _metadata(manifest, r)) for r in group]
            hashes = write_safetensors_files(files, lambda i, name, group=group: piece(name, group[i]), progress)
            for rank, (path, _, _), digest in zip(group, files, hashes, strict=True):
                stage, tp_rank = manifest.grid.coordinates(rank)
                entry = {"rank": rank, "stage": stage, "tp_rank": tp_rank, "file": path.name}
                manifest.files.append(entry | {"bytes": path.stat().st_size, "sha256": digest})
        manifest.source = describe_source()
        manifest.tokenizer = None
        if tokenizer_file is not None:
            assert tokenizer_name is not None
            shutil.copyfile(tokenizer_file, tmp / tokenizer_name)
            manifest.tokenizer = tokenizer_name
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


# --- reading ------------------------------------------------------------------------------------


def _require(cond: bool, where: Path, what: str) -> None:
    if not cond:
        what = what if len(what) <= 300 else what[:300] + "..."  # a forged value can be megabytes long
        raise TpshardError(f"{where}: invalid manifest: {what}; re-create the shard set with tpshard split")


def _check_text(data: object, where: Path) -> None:
    """Every string of the manifest (keys included) is text: JSON's "\\ud800" escapes decode to lone
    surrogates, which no file name, terminal or UTF-8 file can hold (they fail later, as tracebacks)."""
    try:  # at C speed; the walk below only to name the value
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return
    except (UnicodeEncodeError, RecursionError):
        pass
    todo: list[tuple[object, str]] = [(data, "")]
    while todo:
        value, at = todo.pop()
        if isinstance(value, str):
            _require(is_text(value), where, f"{at or 'a value'} holds a lone surrogate, not text: {value!r}")
        elif isinstance(value, dict):
            for key, item in value.items():
                _require(is_text(key), where, f"a key in {at or 'the manifest'} holds a lone surrogate: {key!r}")
                todo.append((item, f"{at}.{key}" if at else key))
        elif isinstance(value, list):
            todo.extend((item, f"{at}[{i}]") for i, item in enumerate(value))


# where split and reshard record them (merge reads the training record back through training_record)
SOURCE_FIELDS = {
    "file": str,
    "sha256": str,
    "source_dtype": str,
    "optimizer_left_out": bool,
    "resharded_from_tp": int,
    "resharded_from_pp": int,
}


def _check_source(source: dict, where: Path) -> None:
    for key, kind in SOURCE_FIELDS.items():
        value = source.get(key)
        ok = value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
        _require(ok, where, f"source {key} {value!r} is not a {kind.__name__}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _grid(data: dict, tp_size: int, version: int, where: Path) -> ParallelDims:
    """The grid a manifest records; a manifest written before grids were recorded is tp x 1."""
    grid = data.get("grid", {"tp": tp_size, "pp": 1})
    _require(isinstance(grid, dict), where, "'grid' is not an object")
    tp, pp = grid.get("tp"), grid.get("pp")
    _require(_is_int(tp) and _is_int(pp), where, f"grid {grid!r}")
    _require(tp == tp_size, where, f"grid tp {tp} but tp_size {tp_size}")
    _require(pp >= 1, where, f"grid pp {pp}")
    _require(pp == 1 or version >= PIPELINE_FORMAT_VERSION, where, f"{pp} pipeline stages in a version {version} set")
    _require(pp > 1 or version == FORMAT_VERSION, where, f"a version {version} set of one pipeline stage")
    return ParallelDims(tp, pp)


def _stages(data: dict, grid: ParallelDims, config: GPTConfig, where: Path) -> Stages:
    """Each stage's blocks: contiguous, in order, at least one each, every block once."""
    if grid.pp == 1:
        return Stages.one(config.n_layer)
    stages = data.get("stages")
    _require(isinstance(stages, list) and len(stages) == grid.pp, where, f"'stages' does not list {grid.pp} stages")
    end = 0
    layers = []
    for s, entry in enumerate(stages):
        _require(isinstance(entry, dict) and entry.get("stage") == s, where, f"stages[{s}] is not stage {s}")
        blocks = entry.get("layers")
        ok = isinstance(blocks, list) and len(blocks) == 2 and all(_is_int(b) for b in blocks)
        _require(ok and blocks[0] == end and blocks[1] > end, where, f"stages[{s}] layers {blocks!r} after layer {end}")
        ranks = entry.get("ranks")
        _require(ranks == grid.tp_group(grid.rank(s, 0)), where, f"stages[{s}] ranks {ranks!r}")
        layers.append(blocks[1] - blocks[0])
        end = blocks[1]
    _require(end == config.n_layer, where, f"the stages hold {end} layers, the model has {config.n_layer}")
    return Stages(tuple(layers))


def parse_manifest(data: object, where: Path) -> Manifest:
    """Check a manifest's structure and types before trusting any of it."""
    _require(isinstance(data, dict), where, "not a JSON object")
    assert isinstance(data, dict)
    _require(data.get("format") == FORMAT, where, f"format is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if type(version) is not int or version not in (FORMAT_VERSION, PIPELINE_FORMAT_VERSION):  # not True (== 1)
        raise TpshardError(
            f"{where}: shard format version {version!r} is not supported (this tpshard reads versions "
            f"{FORMAT_VERSION} and {PIPELINE_FORMAT_VERSION}); use a matching tpshard or re-split"
        )
    for key, kind in (("tp_size", int), ("model_args", dict), ("dtype", str), ("tensors", dict), ("files", list)):
        _require(isinstance(data.get(key), kind), where, f"'{key}' missing or not a {kind.__name__}")
    tp_size = data["tp_size"]
    _require(not isinstance(tp_size, bool) and tp_size >= 1, where, f"tp_size {tp_size!r}")
    _require(data["dtype"] in DTYPES, where, f"dtype {data['dtype']!r} unknown")
    config = config_from_model_args(data["model_args"], where)
    divides = config.n_head % tp_size == 0 and 4 * config.n_embd % tp_size == 0
    _require(divides, where, f"tp_size {tp_size} does not divide n_head={config.n_head} and 4*n_embd")
    grid = _grid(data, tp_size, version, where)
    vocab_parallel = data.get("vocab_parallel", False)
    _require(isinstance(vocab_parallel, bool), where, f"vocab_parallel {vocab_parallel!r}")
    # before the table is built: a forged n_layer=10**9 would make it a billion entries
    enough = len(data["tensors"]) >= MIN_TENSORS_PER_LAYER * config.n_layer
    _require(enough, where, f"n_layer={config.n_layer} but {len(data['tensors'])} tensors listed")
    expected = tensor_table(config, vocab_parallel, grid.pp)
    _require(data["tensors"] == expected, where, "tensor table disagrees with model_args and the split rules")
    stages = _stages(data, grid, config, where)
    files = data["files"]
    _require(len(files) == grid.world_size, where, f"{len(files)} files listed for a grid of {grid.world_size} ranks")
    for rank, entry in enumerate(files):
        _check_file_entry(entry, rank, grid, where)
    names = [entry["file"] for entry in files]
    _require(len(set(names)) == len(names), where, "a file is listed for two ranks")
    tokenizer = data.get("tokenizer")
    _require(tokenizer is None or plain_name(tokenizer), where, f"tokenizer {tokenizer!r}")
    _require(tokenizer not in (*names, MANIFEST), where, f"tokenizer {tokenizer!r} is named like a file of the set")
    source = data.get("source", {})
    _require(isinstance(source, dict), where, "source is not an object")
    _check_source(source, where)
    training_record(source, where)  # what merge writes back into the checkpoint: the same checks as a ckpt.pt's
    _check_text(data, where)  # last: its size is bounded by the checks above (one entry per rank, ...)
    dtype = DTYPES[data["dtype"]]
    return Manifest(grid, config, dtype, expected, files, source, tokenizer, version, vocab_parallel, stages)


def _check_file_entry(entry: object, rank: int, grid: ParallelDims, where: Path) -> None:
    _require(isinstance(entry, dict), where, f"files[{rank}] is not an object")
    assert isinstance(entry, dict)
    _require(entry.get("rank") == rank, where, f"files[{rank}] has rank {entry.get('rank')!r}")
    stage, tp_rank = grid.coordinates(rank)
    position = entry.get("stage", stage), entry.get("tp_rank", tp_rank)  # absent: written before grids
    _require(position == (stage, tp_rank), where, f"files[{rank}] at (stage, tp rank) {position!r}")
    name = entry.get("file")
    _require(rank_file_name_ok(name), where, f"files[{rank}] name {name!r}")
    size, digest = entry.get("bytes"), entry.get("sha256")
    _require(_is_int(size) and size > 8, where, f"files[{rank}] bytes {size!r}")
    _require(isinstance(digest, str) and len(digest) == 64, where, f"files[{rank}] sha256 {digest!r}")


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
        return cls(directory, parse_manifest(read_manifest(directory), directory / MANIFEST))

    @property
    def tp_size(self) -> int:
        return self.manifest.tp_size

    def rank_path(self, rank: int) -> Path:
        return self.directory / self.manifest.files[rank]["file"]

    @property
    def tokenizer_path(self) -> Path | None:
        return self.directory / self.manifest.tokenizer if self.manifest.tokenizer else None

    def check_file(
        self, rank: int, *, checksum: bool = True, progress: Progress | None = None, digest: FileHash | None = None
    ) -> None:
        """Raise TpshardError unless rank's file is present, of its recorded size (and sha256), and its
        safetensors header holds exactly the expected tensors and says it is this rank of this set.
        digest: the file's hash if one was begun already (digests.take)."""
        entry, path = self.manifest.files[rank], self.rank_path(rank)
        size, problem = file_status(path)
        if problem:
            raise TpshardError(f"{path}: rank {rank}'s shard file is {problem}")
        if size != entry["bytes"]:
            raise TpshardError(f"{path}: {size} bytes, the manifest records {entry['bytes']} (truncated or replaced)")
        if checksum:
            digest = digest or take(path)
            digest.attach(progress)
            self.check_sha256(rank, digest)
        try:
            with open_safetensors(path) as f:
                self._check_header(f, path, rank)
        except OSError as e:
            raise TpshardError(f"{path}: cannot read rank {rank}'s shard file ({e.strerror})") from None

    def check_sha256(self, rank: int, digest: FileHash) -> None:
        """Raise TpshardError unless digest, of rank's file (waited for), is the manifest's sha256, and
        the file has not changed since it was hashed (FileHash.digest)."""
        path = self.rank_path(rank)
        try:
            found = digest.digest()
        except OSError as e:
            raise TpshardError(f"{path}: cannot read rank {rank}'s shard file ({e.strerror})") from None
        if found != self.manifest.files[rank]["sha256"]:
            raise TpshardError(f"{path}: sha256 differs from the manifest: the file is corrupt or was modified")

    def _check_header(self, f, path: Path, rank: int) -> None:
        meta = f.metadata() or {}
        grid = self.manifest.grid
        pp = meta.get("pp_size", "1")
        if meta.get("format") != FORMAT or meta.get("tp_size") != str(self.tp_size) or pp != str(grid.pp):
            what = f"{self.tp_size}-way" if grid.pp == 1 else f"tp {grid.tp} x pp {grid.pp}"
            raise TpshardError(f"{path}: not a rank file of this {what} shard set (metadata {meta})")
        if meta.get("rank") != str(rank):
            raise TpshardError(f"{path}: holds rank {meta.get('rank')}, expected rank {rank} (files swapped?)")
        layout = {name: (dtype, shape) for name, dtype, shape in self.manifest.layout(rank)}
        if set(f.keys()) != set(layout):
            raise TpshardError(f"{path}: its tensors differ from the manifest's")
        for name, (dtype, shape) in layout.items():
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != shape or sl.get_dtype() != SAFETENSORS_CODES[dtype]:
                raise TpshardError(f"{path}: {name} is {sl.get_dtype()} {sl.get_shape()}, manifest says {shape}")

    def load_rank(self, rank: int, *, checksum: bool = True) -> dict[str, torch.Tensor]:
        """Rank's pieces, memory-mapped copy-on-write: only this rank's file is read."""
        self.check_file(rank, checksum=checksum)
        return read_tensors(self.rank_path(rank))

    def load_pieces(self, ranks: list[int], *, checksum: bool = True) -> dict[str, list[torch.Tensor]]:
        """Every tensor the given ranks hold, with its pieces of those ranks in rank order (a stage's
        tensors come from that stage's ranks only)."""
        loaded = [self.load_rank(r, checksum=checksum) for r in ranks]
        pieces = {name: [rank[name] for rank in loaded if name in rank] for name in self.manifest.tensors}
        return {name: found for name, found in pieces.items() if found}


def rank_file_identity(path: Path) -> tuple[int, int, str] | None:
    """(rank, tp_size, format version) from a .safetensors file's tpshard metadata; None when the file
    is not a rank file (a dense safetensors checkpoint, say)."""
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        return None
    try:
        return int(meta["rank"]), int(meta["tp_size"]), meta.get("format_version", "?")
    except (KeyError, ValueError):
        raise TpshardError(f"{path}: tpshard rank file with no valid rank / tp_size in its metadata ({meta})") from None
