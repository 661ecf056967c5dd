"""verify's first part: the rank files against the manifest, the damage located, the merge compared."""

from dataclasses import asdict
from pathlib import Path

import torch

from tpshard.errors import TpshardError
from tpshard.files.atomic import file_status
from tpshard.files.checkpoint import Checkpoint
from tpshard.files.digests import sha256_file
from tpshard.files.pages import drop_file_pages
from tpshard.files.shardset import ShardSet
from tpshard.files.tensorfile import DTYPE_NAMES, data_offsets, open_safetensors
from tpshard.parallel import plan
from tpshard.tokenizer import load_tokenizer_file
from tpshard.verify.report import FileCheck, Integrity, MergeCheck


def check_integrity(shards: ShardSet, reference: Checkpoint | None, against: str | Path | None) -> Integrity:
    """Every rank file checked (none skipped because another failed), then the damage located and,
    with a reference, the merge compared bit for bit."""
    files = [_check_file(shards, rank) for rank in range(shards.manifest.grid.world_size)]  # every stage's
    usable = reference is not None and _same_model(shards, reference) is None
    for check in files:
        if check.status == "corrupt":
            _locate_damage(shards, check, files, reference if usable else None)
    merge = _check_merge(shards, reference, against, files) if reference is not None else None
    problems = [f"{c.file}: {c.problem}" + _damage_note(c) for c in files if c.status != "ok"]
    if merge is not None and merge.problem:
        problems.append(f"merge vs {Path(merge.against).name}: {merge.problem}")
    tokenizer = _check_tokenizer(shards)
    if tokenizer not in (None, "ok"):
        problems.append(f"{shards.manifest.tokenizer}: {tokenizer}")
    return Integrity(
        passed=not problems,
        manifest_ok=True,
        format_version=shards.manifest.format_version,
        files=files,
        merge=merge,
        tokenizer=shards.manifest.tokenizer,
        tokenizer_status=tokenizer,
        problems=problems,
    )


def _check_tokenizer(shards: ShardSet) -> str | None:
    """"ok" when the tokenizer the manifest names is there and loads (a meta.pkl through the unpickler
    that refuses every global), else what is wrong; None when the set ships none."""
    path = shards.tokenizer_path
    if path is None:
        return None
    _, problem = file_status(path)
    if problem:
        return f"the shard set's tokenizer (named in the manifest) is {problem}"
    try:
        tokenizer = load_tokenizer_file(path)
    except TpshardError as e:
        return str(e).removeprefix(f"{path}: ")
    if tokenizer.vocab_size > shards.manifest.config.vocab_size:
        return f"{tokenizer.vocab_size} tokens, more than the model's vocab_size {shards.manifest.config.vocab_size}"
    return "ok"


def _damage_note(check: FileCheck) -> str:
    if check.damaged_tensors:
        return f" (damaged tensor: {check.damaged_tensors[0]})"
    return ""


def _check_file(shards: ShardSet, rank: int) -> FileCheck:
    entry, path = shards.manifest.files[rank], shards.rank_path(rank)
    check = FileCheck(rank=rank, file=entry["file"], status="ok", expected_bytes=entry["bytes"])
    size, problem = file_status(path)
    if problem == "missing":
        check.status, check.problem = "missing", "the file is missing"
        return check
    if problem:  # a link loop, a directory, ...: no file to read
        check.status, check.problem = "unreadable", f"the file is {problem}"
        return check
    check.bytes = size
    check.holds_rank = _holds_rank(path)
    try:  # size, safetensors header, tensor names, shapes and dtypes, rank / tp metadata
        shards.check_file(rank, checksum=False)
    except TpshardError as e:
        check.problem = str(e).removeprefix(f"{path}: ")
        if check.bytes != check.expected_bytes:
            check.status = "wrong size"
        elif check.holds_rank is not None and check.holds_rank != rank:
            check.status = "wrong rank"
        else:
            check.status = "bad header"
    if check.bytes == check.expected_bytes:
        try:
            check.sha256_matches = sha256_file(path) == entry["sha256"]
        except OSError as e:
            check.status, check.problem = "unreadable", f"cannot read the file ({e.strerror})"
            return check
        if not check.sha256_matches and check.status == "ok":
            check.status, check.problem = "corrupt", "sha256 differs from the manifest's"
    return check


def _holds_rank(path: Path) -> int | None:
    try:
        with open_safetensors(path) as f:
            return int((f.metadata() or {})["rank"])
    except (TpshardError, KeyError, ValueError, OSError):
        return None


def _locate_damage(shards: ShardSet, check: FileCheck, files: list[FileCheck], reference: Checkpoint | None) -> None:
    """Which tensor holds the bad bytes: compare the file's tensors with the reference's pieces, or
    else its replicated tensors with an intact rank's copies (split tensors have nothing to compare to)."""
    m, rank = shards.manifest, check.rank
    stage, tp_rank = m.grid.coordinates(rank)
    if reference is not None:
        names = m.stage_tensors(stage)
        expected = lambda name: plan.shard(name, reference.state_dict[name], tp_rank, m.tp_size, m.vocab_parallel)  # noqa: E731
        check.located_by = "compared with the --against checkpoint's piece for this rank"
    else:
        intact = next((c.rank for c in files if c.status == "ok" and c.rank in m.grid.tp_group(rank)), None)
        if intact is None:
            check.located_by = "not located: no intact rank to compare with; pass --against CKPT to name the tensor"
            return
        names = [n for n in m.stage_tensors(stage) if plan.rule_for(n, m.vocab_parallel) is plan.Rule.REPLICATED]
        with open_safetensors(shards.rank_path(intact)) as f:
            replicas = {name: f.get_tensor(name) for name in names}
        expected = replicas.__getitem__
        check.located_by = f"replicated tensors compared with rank {intact}'s copies"
    offsets = data_offsets(shards.rank_path(rank))
    with open_safetensors(shards.rank_path(rank)) as f:
        for name in names:
            stored = f.get_tensor(name)
            byte = first_different_byte(stored, expected(name).to(m.dtype))
            if byte is None:
                continue
            check.damaged_tensors.append(name)
            if check.first_bad_byte is None and name in offsets:
                check.first_bad_byte = offsets[name] + byte
    if not check.damaged_tensors:
        check.located_by = (
            "not located: every replicated tensor matches; the damage is in a split tensor or the header "
            "(pass --against CKPT to name the tensor)"
            if reference is None
            else "not located: every tensor matches the reference; the damage is outside the tensor data"
        )


COMPARE_BYTES = 16 << 20


def first_different_byte(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Offset of the first byte where two tensors' data differ (bits, so NaN == NaN and -0.0 != 0.0);
    None when they are identical."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 0
    a, b = a.contiguous().view(torch.uint8).flatten(), b.contiguous().view(torch.uint8).flatten()
    if torch.equal(a, b):  # the common case, without a mask of the tensor's size
        return None
    for start in range(0, a.numel(), COMPARE_BYTES):  # a mask of COMPARE_BYTES at a time
        differ = (a[start : start + COMPARE_BYTES] != b[start : start + COMPARE_BYTES]).nonzero()
        if len(differ):
            return start + int(differ[0])
    return None


def _same_model(shards: ShardSet, reference: Checkpoint) -> str | None:
    """Why the reference cannot be this shard set's model, or None."""
    ours, theirs = asdict(shards.manifest.config), asdict(reference.config)
    differ = [f"{k} {theirs[k]} vs the shards' {ours[k]}" for k in ours if k != "dropout" and ours[k] != theirs[k]]
    return f"not this shard set's model: model_args differ ({', '.join(differ)})" if differ else None


def _check_merge(
    shards: ShardSet, reference: Checkpoint, against: str | Path | None, files: list[FileCheck]
) -> MergeCheck:
    m = shards.manifest
    merge = MergeCheck(against=str(against))
    if reference.dtype != m.dtype:
        merge.cast = f"the reference's {DTYPE_NAMES.get(reference.dtype)} cast to {DTYPE_NAMES[m.dtype]}"
    recorded = m.source.get("sha256")
    if recorded and reference.path.is_file() and reference.path.name == m.source.get("file"):
        merge.source_sha256_matches = sha256_file(reference.path) == recorded
        merge.source_file = reference.path.name
    merge.problem = _same_model(shards, reference)
    if merge.problem:
        return merge
    unreadable = [c.file for c in files if c.status not in ("ok", "corrupt")]
    if unreadable:
        merge.problem = f"not compared: {', '.join(unreadable)} cannot be read as this set's rank files"
        return merge
    pieces = shards.load_pieces(list(range(m.grid.world_size)), checksum=False)  # the last stage's lm_head: wte's
    for name, ranks in pieces.items():
        merge.tensors += 1
        dense = reference.state_dict[name]
        byte = first_different_byte(m.unshard(name, ranks), dense.to(m.dtype))
        for tensor in (*ranks, dense):  # compared: their pages leave this process (files/pages.py)
            drop_file_pages(tensor)
        if byte is None:
            merge.identical += 1
        elif merge.first_difference is None:
            merge.first_difference = f"{name} (flat element {byte // m.dtype.itemsize})"
    if merge.first_difference:
        differing = merge.tensors - merge.identical
        merge.problem = f"{differing} tensor(s) differ from the reference, first {merge.first_difference}"
    return merge
