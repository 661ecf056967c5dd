"""Other people's files, trusted for nothing: every subcommand against missing, misplaced, empty, foreign,
truncated, bit-flipped and forged inputs, forged manifests, missing / duplicated / swapped rank files, bad
tp sizes, awkward paths, read-only, full and existing outputs, and files that claim absurd sizes.

The contract (`refused`): exit 2, one line `tpshard: error: ...` on stderr naming the culprit, nothing on
stdout, no traceback, and the directory tree byte for byte as before (no output, no `.name.*.partial`).
inspect and verify may instead exit 1 with a report: checking shard sets is their job.
Valid input under awkward paths must simply work.
"""

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tpshard.cli.app import app
from tpshard.config import GPTConfig
from tpshard.convert import merge_shards, split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import model_args
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet, tensor_table
from tpshard.model import GPT
from tpshard.parallel.plan import dense_shapes
from tpshard.testing import random_weights

FUZZ_EXAMPLES = 150  # per fuzz test in the default suite; the slow suite runs 3000
EXAMPLES = [FUZZ_EXAMPLES, pytest.param(3000, marks=pytest.mark.slow)]
R0, R1 = "rank0-of-2.safetensors", "rank1-of-2.safetensors"

# --- the contract ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under root, hidden ones included: relative path -> 'dir', a link's target, or the
    file's sha256 (size and inode for the sparse giants of the absurd-size tests, which are never written)."""
    tree: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                tree[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                tree[rel] = "dir"
            elif path.stat().st_size > 64 << 20:
                tree[rel] = (path.stat().st_size, path.stat().st_ino, path.stat().st_mtime_ns)
            else:
                tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def one_line(code: object, out: str, err: str) -> str:
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert out == "", out
    assert err.startswith("tpshard: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err


def refused(cli, root: Path, *args: object, culprit: str | None = None, checker: bool = False) -> str:
    """Run tpshard in-process (an unexpected exception fails the test, traceback and all); check the
    refusal and that nothing under root changed. Returns stderr."""
    before = snapshot(root)
    code, out, err = cli(*args)
    assert "Traceback" not in err
    if not (checker and code == 1):  # inspect / verify: 1 is "the check failed", with a report on stdout
        one_line(code, out, err)
        if culprit is not None:
            assert culprit in err, err
    assert snapshot(root) == before
    return err


# --- every subcommand ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """How a command runs on the input under test (a checkpoint or a shard set), in work directory w."""

    argv: Callable[[Path, Path, str], list]  # (input, w, kind) -> arguments
    reads: tuple[str, ...]  # "checkpoint", "shards"
    checker: bool = False  # may answer a damaged input with exit 1 and a report
    accepts: tuple[str, ...] = ()  # cases below that are valid input for this command


def _verify(src: Path, w: Path, kind: str) -> list:
    """verify SHARDS --against CKPT: the input under test on its side, a good one on the other."""
    if kind == "shards":
        return ["verify", src, "--against", w / "model" / "ckpt.pt", "--tokens", 1, "--random-tokens", 4]
    return ["verify", w / "shards", "--against", src, "--tokens", 1, "--random-tokens", 4]


COMMANDS = {
    "split": Command(lambda src, w, _: ["split", src, "--tp", 2, "-o", w / "out"], ("checkpoint",)),
    "merge": Command(lambda src, w, _: ["merge", src, "-o", w / "merged.pt"], ("shards",)),
    "reshard": Command(lambda src, w, _: ["reshard", src, "--tp", 4, "-o", w / "out"], ("shards",)),
    "inspect": Command(
        lambda src, w, _: ["inspect", src, "--checksums"], ("checkpoint", "shards"), True, ("a shard file",)
    ),
    "verify": Command(_verify, ("checkpoint", "shards"), checker=True),
    "generate": Command(
        lambda src, w, _: ["generate", src, "--max-new-tokens", 2, "--greedy", "--prompt", "ab"],
        ("checkpoint", "shards"),
    ),
}


def registered() -> dict[str, Callable]:
    return {c.name or c.callback.__name__: c.callback for c in app.registered_commands}


def implemented(name: str) -> bool:
    return not (registered()[name].__doc__ or "").strip().startswith("Not implemented")


def test_every_command_is_covered() -> None:
    """A new subcommand must be added to COMMANDS, and so to every refusal below."""
    assert set(registered()) == set(COMMANDS)


def pairs(kind: str, cases: dict) -> list:
    return [
        pytest.param(name, case, id=f"{name}-{case}")
        for name, command in COMMANDS.items()
        if kind in command.reads
        for case in cases
        if case not in command.accepts
    ]


# --- the world each test damages: a checkpoint (with meta.pkl) and its 2-way shard set ----------------------


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def state_dict(config: GPTConfig = BIAS_CONFIG) -> dict[str, torch.Tensor]:
    return random_weights(GPT(config), seed=3).state_dict()


def nanogpt(**changes: object) -> dict:
    """A train.py-style checkpoint dict, with some entries changed."""
    return {"model": state_dict(), "model_args": model_args(BIAS_CONFIG), "config": {"dataset": "x"}, **changes}


def args(**changes: object) -> dict:
    return {**model_args(BIAS_CONFIG), **changes}


def expanded_wte() -> dict[str, torch.Tensor]:
    state = state_dict()
    state["transformer.wte.weight"] = torch.zeros(1).expand(BIAS_CONFIG.vocab_size, BIAS_CONFIG.n_embd)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def zip_of_text(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    return path


def legacy_torch(path: Path) -> Path:
    torch.save(nanogpt(), path, _use_new_zipfile_serialization=False)
    return path


def truncated(w: Path, keep: float) -> Path:
    data = (w / "model" / "ckpt.pt").read_bytes()
    return write(w / "cut.pt", data[: int(len(data) * keep)])


# name -> make(w) -> the bad checkpoint (the error line must name it)
BAD_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "missing": lambda w: w / "nope.pt",
    "a directory": lambda w: (w / "folder").mkdir() or w / "folder",
    "empty file": lambda w: write(w / "empty.pt", b""),
    "text file": lambda w: write(w / "log.pt", "step,loss\n1,4.2\n"),
    "random bytes": lambda w: write(w / "noise.pt", random.Random(0).randbytes(4096)),
    "zip, not torch": lambda w: zip_of_text(w / "archive.pt"),
    "legacy torch format": lambda w: legacy_torch(w / "legacy.pt"),
    "truncated in half": lambda w: truncated(w, 0.5),
    "truncated by one byte": lambda w: truncated(w, 1 - 1e-9),
    "a shard file": lambda w: w / "shards" / R0,
    "a list": lambda w: save(w / "list.pt", [1, 2, 3]),
    "no model_args": lambda w: save(w / "no_args.pt", {"state_dict": state_dict()}),
    "model_args not a dict": lambda w: save(w / "args_list.pt", nanogpt(model_args=[1, 2])),
    "shapes disagree": lambda w: save(w / "shapes.pt", nanogpt(model_args=args(n_embd=2 * BIAS_CONFIG.n_embd))),
    "n_layer beyond the tensors": lambda w: save(w / "layers.pt", nanogpt(model_args=args(n_layer=10**9))),
    "n_head does not divide n_embd": lambda w: save(w / "heads.pt", nanogpt(model_args=args(n_head=5))),
    "integer weights": lambda w: save(w / "ints.pt", nanogpt(model={k: v.int() for k, v in state_dict().items()})),
    "expanded tensor": lambda w: save(w / "expanded.pt", nanogpt(model=expanded_wte())),
    "tensor names not strings": lambda w: save(w / "keys.pt", nanogpt(model=dict(enumerate(state_dict().values())))),
    "iter_num a string": lambda w: save(w / "iter.pt", nanogpt(iter_num="250")),
    "best_val_loss a vector": lambda w: save(w / "loss.pt", nanogpt(best_val_loss=torch.ones(3))),
    "config holds a tensor": lambda w: save(w / "cfg.pt", nanogpt(config={"lr": torch.tensor(1e-3)})),
}


@pytest.mark.parametrize(("command", "case"), pairs("checkpoint", BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused(command: str, case: str, w: Path, cli) -> None:
    if not implemented(command):
        pytest.skip(f"tpshard {command} is not implemented yet")
    bad = BAD_CHECKPOINTS[case](w)
    cmd = COMMANDS[command]
    refused(cli, w, *cmd.argv(bad, w, "checkpoint"), culprit=bad.name, checker=cmd.checker)


def edit_manifest(w: Path, change: Callable[[dict], object]) -> None:
    path = w / "shards" / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def resign(w: Path, rank: int) -> None:
    """Record a rank file's real size and sha256 in the manifest, so that the checks after those run."""
    path = w / "shards" / f"rank{rank}-of-2.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_manifest(w, lambda m: m["files"][rank].update(bytes=path.stat().st_size, sha256=digest))


def swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rank1(w: Path) -> Path:
    return w / "shards" / R1


def damage(action: Callable[[Path], object], culprit: str) -> Callable[[Path], tuple[Path, str]]:
    """A case that damages w's shard set; the error line must name culprit."""
    return lambda w: (action(w), (w / "shards", culprit))[1]


def manifest(change: Callable[[dict], object], culprit: str = MANIFEST) -> Callable[[Path], tuple[Path, str]]:
    return damage(lambda w: edit_manifest(w, change), culprit)


def set_key(key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m.__setitem__(key, value)


def consistent(**changes: object) -> Callable[[dict], None]:
    """model_args changed and the tensor table rewritten to match: a manifest that agrees with itself, but
    not with the rank files."""

    def change(m: dict) -> None:
        m["model_args"].update(changes)
        m["tensors"] = tensor_table(GPTConfig(**m["model_args"]), m["vocab_parallel"])

    return change


def three_ranks(m: dict) -> None:
    m["tp_size"] = 3
    m["files"].append({**m["files"][1], "rank": 2, "file": "rank2-of-3.safetensors"})


def duplicate(w: Path) -> None:
    shutil.copyfile(w / "shards" / R0, rank1(w))
    resign(w, 1)


def swap_and_resign(w: Path) -> None:
    swap(w / "shards" / R0, rank1(w))
    resign(w, 0)
    resign(w, 1)


def replace_manifest(content: bytes | str) -> Callable[[Path], tuple[Path, str]]:
    return damage(lambda w: write(w / "shards" / MANIFEST, content), MANIFEST)


def manifest_dir(w: Path) -> None:
    (w / "shards" / MANIFEST).unlink()
    (w / "shards" / MANIFEST).mkdir()


def rank_dir(w: Path) -> None:
    rank1(w).unlink()
    rank1(w).mkdir()


REQUIRED = ("format", "format_version", "tp_size", "model_args", "dtype", "tensors", "files")

# name -> make(w) -> (the shard directory to give, a name the error line must hold)
BAD_SHARDS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "missing": lambda w: (w / "nope", "nope"),
    "a file": lambda w: (write(w / "notes.txt", "hello"), "notes.txt"),
    "empty directory": lambda w: ((w / "void").mkdir(), (w / "void", "void"))[1],
    "no manifest": damage(lambda w: (w / "shards" / MANIFEST).unlink(), MANIFEST),
    "manifest is a directory": damage(manifest_dir, MANIFEST),
    "manifest empty": replace_manifest(""),
    "manifest not JSON": replace_manifest("{'format': 'tpshard'"),
    "manifest binary": replace_manifest(bytes(range(256))),
    "manifest a list": replace_manifest("[]"),
    "manifest nested too deep": replace_manifest("[" * 100_000 + "]" * 100_000),
    **{f"manifest without {key}": manifest(lambda m, k=key: m.pop(k)) for key in REQUIRED},
    **{f"format_version {v!r}": manifest(set_key("format_version", v)) for v in (2, "1", True, None, 1.5)},
    **{f"tp_size {v!r}": manifest(set_key("tp_size", v)) for v in ("2", 2.5, 0, -2, True, 10**9)},
    "tp_size 3 does not divide": manifest(three_ranks),
    "dtype unknown": manifest(set_key("dtype", "int8")),
    "dtype not a string": manifest(set_key("dtype", 32)),
    "model_args a list": manifest(set_key("model_args", [])),
    "model_args n_embd a string": manifest(lambda m: m["model_args"].update(n_embd="32")),
    "model_args n_layer 10**9": manifest(lambda m: m["model_args"].update(n_layer=10**9)),
    "model_args n_head 10**9": manifest(lambda m: m["model_args"].update(n_head=10**9, n_embd=10**9)),
    "shapes disagree with model_args": manifest(lambda m: m["model_args"].update(n_embd=64)),
    "a tensor shape changed": manifest(lambda m: m["tensors"]["transformer.wte.weight"].update(shape=[96, 64])),
    "tensors a list": manifest(set_key("tensors", [])),
    "files an object": manifest(set_key("files", {})),
    "files entry a string": manifest(lambda m: m["files"].__setitem__(0, R0)),
    "files bytes a string": manifest(lambda m: m["files"][0].update(bytes="70864")),
    "files sha256 a number": manifest(lambda m: m["files"][0].update(sha256=0)),
    "file name climbs out": manifest(lambda m: m["files"][0].update(file="../model/ckpt.pt")),
    "file name absolute": manifest(lambda m: m["files"][0].update(file="/etc/passwd")),
    "file listed for two ranks": manifest(lambda m: m["files"][1].update(file=R0)),
    "an extra rank listed": manifest(lambda m: m["files"].append({**m["files"][1], "rank": 2})),
    "ranks out of order": manifest(lambda m: m["files"].reverse()),
    "tokenizer climbs out": manifest(set_key("tokenizer", "../model/meta.pkl")),
    "tokenizer '..'": manifest(set_key("tokenizer", "..")),
    "vocab_parallel a string": manifest(set_key("vocab_parallel", "no")),
    "source a list": manifest(set_key("source", [])),
    "source best_val_loss a string": manifest(lambda m: m["source"].update(best_val_loss="low")),
    "source config a string": manifest(lambda m: m["source"].update(config="cfg")),
    # the manifest agrees with itself, not with the files
    "fewer layers than the files": manifest(consistent(n_layer=1), R0),
    "no biases, unlike the files": manifest(consistent(bias=False), R0),
    "dtype unlike the files": manifest(set_key("dtype", "float16"), R0),
    # the rank files
    "rank file missing": damage(lambda w: rank1(w).unlink(), R1),
    "rank file is a directory": damage(rank_dir, R1),
    "rank file empty": damage(lambda w: write(rank1(w), b""), R1),
    "rank file truncated": damage(lambda w: write(rank1(w), rank1(w).read_bytes()[:-100]), R1),
    "rank file grown": damage(lambda w: write(rank1(w), rank1(w).read_bytes() + b"\0"), R1),
    "rank file bit flipped in the data": damage(lambda w: flip(rank1(w), -5), R1),
    "rank file bit flipped in the header": damage(lambda w: flip(rank1(w), 40), R1),
    "rank file header damaged, manifest re-signed": damage(lambda w: (flip(rank1(w), 40), resign(w, 1)), R1),
    "rank 0 duplicated as rank 1": damage(duplicate, R1),
    "rank files swapped": damage(lambda w: swap(w / "shards" / R0, rank1(w)), R0),
    "rank files swapped, manifest re-signed": damage(swap_and_resign, R0),
}


@pytest.mark.parametrize(("command", "case"), pairs("shards", BAD_SHARDS))
def test_bad_shard_set_is_refused(command: str, case: str, w: Path, cli) -> None:
    if not implemented(command):
        pytest.skip(f"tpshard {command} is not implemented yet")
    bad, culprit = BAD_SHARDS[case](w)
    cmd = COMMANDS[command]
    refused(cli, w, *cmd.argv(bad, w, "shards"), culprit=culprit, checker=cmd.checker)


def test_reshard_names_a_missing_tokenizer_before_writing(w: Path, cli) -> None:
    (w / "shards" / "meta.pkl").unlink()
    refused(cli, w, "reshard", w / "shards", "--tp", 4, "-o", w / "out", culprit="meta.pkl")


BAD_TOKENIZERS: dict[str, Callable[[Path], Path]] = {
    "missing": lambda w: w / "nope.pkl",
    "a directory": lambda w: (w / "tok").mkdir() or w / "tok",
    "empty meta.pkl": lambda w: write(w / "meta.pkl", b""),
    "truncated meta.pkl": lambda w: write(w / "cut.pkl", (w / "model" / "meta.pkl").read_bytes()[:100]),
    "random bytes": lambda w: write(w / "noise.tiktoken", random.Random(1).randbytes(512)),
    "a checkpoint": lambda w: w / "model" / "ckpt.pt",
}


@pytest.mark.parametrize("case", BAD_TOKENIZERS)
@pytest.mark.parametrize("command", ["split", "generate"])
def test_bad_tokenizer_option_is_refused(command: str, case: str, w: Path, cli) -> None:
    bad = BAD_TOKENIZERS[case](w)
    ckpt = w / "model" / "ckpt.pt"
    argv = (
        ["split", ckpt, "--tp", 2, "-o", w / "out"]
        if command == "split"
        else ["generate", ckpt, "--max-new-tokens", 2, "--prompt", "ab"]
    )
    refused(cli, w, *argv, "--tokenizer", bad, culprit=bad.name)


# --- tp sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [3, 0, -1, 10**9])
@pytest.mark.parametrize("command", ["split", "reshard"])
def test_tp_that_does_not_divide_is_refused(command: str, tp: int, w: Path, cli) -> None:
    src = w / "model" / "ckpt.pt" if command == "split" else w / "shards"
    err = refused(cli, w, command, src, "--tp", tp, "-o", w / "out", culprit=f"--tp {tp}")
    assert "valid tp sizes for this model: 1, 2, 4" in err


# --- outputs: existing, unreachable, an input, read-only, full ------------------------------------------------

WRITERS: dict[str, Callable[[Path, Path], list]] = {  # every command that writes, in every output format
    "split": lambda w, out: ["split", w / "model" / "ckpt.pt", "--tp", 2, "-o", out],
    "reshard": lambda w, out: ["reshard", w / "shards", "--tp", 4, "-o", out],
    "merge pt": lambda w, out: ["merge", w / "shards", "-o", out],
    "merge safetensors": lambda w, out: ["merge", w / "shards", "-o", out, "--format", "safetensors"],
    "merge hf": lambda w, out: ["merge", w / "shards", "-o", out, "--format", "hf"],
}


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("writer", WRITERS)
def test_existing_output_is_kept_without_force(writer: str, kind: str, w: Path, cli) -> None:
    out = w / "taken"
    if kind == "file":
        out.write_text("someone's notes")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    err = refused(cli, w, *WRITERS[writer](w, out), culprit="taken")
    assert "already exists" in err and "--force" in err


@pytest.mark.parametrize("writer", WRITERS)
def test_force_never_replaces_the_wrong_kind(writer: str, w: Path, cli) -> None:
    """A directory writer is not let loose on a file, nor a file writer on a directory."""
    out = w / "taken"
    if writer in ("split", "reshard", "merge hf"):
        out.write_text("a file, not a shard set")
    else:
        out.mkdir()
    refused(cli, w, *WRITERS[writer](w, out), "--force", culprit="taken")


FORCED_INTO_INPUTS: dict[str, Callable[[Path], list]] = {  # --force aimed at an input, or a directory holding one
    "split over the checkpoint's directory": lambda w: ["split", w / "model" / "ckpt.pt", "--tp", 2, "-o", w / "model"],
    "split over the work directory": lambda w: ["split", w / "model" / "ckpt.pt", "--tp", 2, "-o", w],
    "reshard over its input": lambda w: ["reshard", w / "shards", "--tp", 4, "-o", w / "shards"],
    "reshard over the input's parent": lambda w: ["reshard", w / "shards", "--tp", 4, "-o", w],
    "merge over a rank file": lambda w: ["merge", w / "shards", "-o", w / "shards" / R0],
    "merge over the manifest": lambda w: ["merge", w / "shards", "-o", w / "shards" / MANIFEST],
    "merge over the tokenizer": lambda w: ["merge", w / "shards", "-o", w / "shards" / "meta.pkl"],
    "merge hf over the shard set": lambda w: ["merge", w / "shards", "-o", w / "shards", "--format", "hf"],
    "merge hf over the input's parent": lambda w: ["merge", w / "shards", "-o", w, "--format", "hf"],
}


@pytest.mark.parametrize("case", FORCED_INTO_INPUTS)
def test_force_never_replaces_an_input(case: str, w: Path, cli) -> None:
    err = refused(cli, w, *FORCED_INTO_INPUTS[case](w), "--force")
    assert "input" in err


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("where", ["parent missing", "parent is a file"])
def test_unreachable_output_is_refused(writer: str, where: str, w: Path, cli) -> None:
    parent = w / "no" / "such" if where == "parent missing" else w / "model" / "meta.pkl"
    refused(cli, w, *WRITERS[writer](w, parent / "out"), culprit=parent.name)


# For the tests that need a process of their own (a mount namespace, resource limits): tpshard's main() run
# once per argv of a JSON list, in one process; prints [code, stdout, stderr, seconds, peak RSS so far in
# bytes] for each, as JSON.
DRIVER = r"""
import contextlib, io, json, resource, sys, time, traceback
import tpshard.cli.main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["tpshard", *argv]
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tpshard.cli.main.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:
            traceback.print_exc(file=err)
            code = f"raised {type(e).__name__}"
    seconds, peak = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    results.append([code, out.getvalue(), err.getvalue(), seconds, peak])
print(json.dumps(results))
"""


def run_driver(argvs: list[list], *, prefix: tuple[str, ...] = (), preexec: Callable[[], None] | None = None) -> list:
    command = [*prefix, sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in argv] for argv in argvs])]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_read_only_output_directory(w: Path) -> None:
    """Every writer aimed into a read-only directory. A normal user gets a chmod; root, whom modes do not
    stop, a read-only bind mount in a mount namespace of the test's own, so that nothing outlives it."""
    ro = w / "read-only"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine")
    argvs = [argv(w, ro / "out") for argv in WRITERS.values()]
    before = snapshot(w)
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            results = run_driver(argvs)
        finally:
            ro.chmod(0o755)
    else:
        mount = f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" && exec "$@"'
        prefix = ("unshare", "-m", "sh", "-c", mount, "sh")
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
        if shutil.which("unshare") is None or probe.returncode != 0:
            pytest.skip(f"root, and no read-only mount to be had: {probe.stderr.strip()}")
        results = run_driver(argvs, prefix=prefix)
    for writer, (code, out, err, *_) in zip(WRITERS, results, strict=True):
        one_line(code, out, err)
        assert "read-only" in err.lower() or "permission denied" in err.lower(), (writer, err)
    assert snapshot(w) == before


def test_full_disk_leaves_nothing_behind(w: Path) -> None:
    """Every writer stopped by the file size limit half-way through a file (EFBIG, as a full disk gives
    ENOSPC): one line, no output, no temporary."""
    argvs = [argv(w, w / f"out {i}") for i, argv in enumerate(WRITERS.values())]
    before = snapshot(w)

    def limit_file_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    for writer, (code, out, err, *_) in zip(WRITERS, run_driver(argvs, preexec=limit_file_size), strict=True):
        one_line(code, out, err)
        assert "writing failed" in err and "unchanged" in err, (writer, err)
    assert snapshot(w) == before


# --- valid input under awkward paths works ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["with spaces", "ünïcödé ñame", "日本語 モデル", "tag [red]x[/]y"])
def test_awkward_paths_work(name: str, template: Path, tmp_path: Path, cli) -> None:
    """Spaces, non-ASCII and markup-like brackets (the last makes a path holding "[/]", which rich would
    take for a closing tag) in every path, input and output."""
    home = tmp_path / name  # "a[/]b" is two directories, "a[" and "]b"
    shutil.copytree(template / "model", home / "my módel")
    ckpt, shards = home / "my módel" / "ckpt.pt", home / "shärds [2]"
    steps = [
        ["split", ckpt, "--tp", 2, "-o", shards],
        ["merge", shards, "-o", home / "mérged [pt].pt"],
        ["merge", shards, "-o", home / "mérged.safetensors", "--format", "safetensors"],
        ["reshard", shards, "--tp", 4, "-o", home / "tp 4"],
        ["inspect", shards, "--checksums"],
        ["inspect", ckpt],
        ["generate", shards, "--max-new-tokens", 3, "--greedy", "--prompt", "ab"],
        ["verify", shards, "--against", ckpt, "--tokens", 2, "--random-tokens", 8, "--batch", 1],
    ]
    outputs = []
    for argv in steps:
        if implemented(argv[0]):
            code, out, err = cli(*argv)
            assert code == 0 and "Traceback" not in err, (argv, err)
            outputs.append(out)
    source = load_checkpoint(ckpt)
    for merged in (home / "mérged [pt].pt", home / "mérged.safetensors"):
        back = load_checkpoint(merged)
        assert all(torch.equal(back.state_dict[k], v) for k, v in source.state_dict.items())
    resharded = ShardSet.open(home / "tp 4")
    for rank in range(4):
        resharded.check_file(rank)
    assert "shärds [2]" in outputs[0]  # printed as itself, not taken for rich markup
    if "[/]" in name:
        assert "[red]x[/]y" in outputs[0]


# --- truncation and flipped bytes, many places ------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_bytes(template: Path) -> bytes:
    return (template / "model" / "ckpt.pt").read_bytes()


def test_truncated_checkpoint_at_many_offsets(ckpt_bytes: bytes, tmp_path: Path) -> None:
    """Every cut refused with one clear error: the zip's records start and end everywhere."""
    size = len(ckpt_bytes)
    offsets = {*range(0, 64, 7), *range(0, size, size // 40), *range(size - 100, size, 9), size - 22, size - 1}
    path = tmp_path / "cut.pt"
    for offset in sorted(offsets):
        path.write_bytes(ckpt_bytes[:offset])
        with pytest.raises(TpshardError, match=r"cut\.pt: "):
            load_checkpoint(path)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def damaged(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, mask in edits:
        out[position % len(out)] ^= mask or 1
    return bytes(out)


def positions(size: int, head: int) -> st.SearchStrategy[int]:
    """In the first `head` bytes (headers, the pickle), the last 4 KB (the zip's directory), or anywhere."""
    return st.one_of(st.integers(0, head - 1), st.integers(max(0, size - 4096), size - 1), st.integers(0, size - 1))


def edits(size: int, head: int, most: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Up to `most` bytes changed (xor masks, each position once: two flips must not cancel out)."""
    flips = st.tuples(positions(size, head), st.integers(1, 255))
    return st.lists(flips, min_size=1, max_size=most, unique_by=lambda e: e[0])


def fuzz(examples: int, strategy: st.SearchStrategy, check: Callable[[object], None]) -> None:
    """Run check on `examples` draws: the default suite's few hundred reproducibly, the slow suite's
    thousands afresh each run."""
    quick = {"derandomize": True, "database": None} if examples <= FUZZ_EXAMPLES else {}
    settings(max_examples=examples, deadline=None, **quick)(given(strategy)(check))()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_flipped_bytes_in_a_checkpoint(examples: int, template: Path, tmp_path: Path) -> None:
    """A damaged ckpt.pt is refused with a TpshardError naming it, or (the flip hit tensor data, which a
    ckpt.pt has no checksum for) it loads as a valid checkpoint that splits cleanly. Nothing else."""
    ckpt_bytes = (template / "model" / "ckpt.pt").read_bytes()
    path, out = tmp_path / "flipped.pt", tmp_path / "out"

    def check(flips: list[tuple[int, int]]) -> None:
        path.write_bytes(damaged(ckpt_bytes, flips))
        shutil.rmtree(out, ignore_errors=True)
        try:
            ckpt = load_checkpoint(path)
        except TpshardError as e:
            assert str(path) in str(e)
            return
        try:
            split_checkpoint(ckpt, 2, out)
        except TpshardError:
            assert not out.exists()
        else:
            assert ShardSet.open(out).tp_size == 2
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    fuzz(examples, edits(len(ckpt_bytes), 2048, 4), check)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_flipped_bytes_in_a_rank_file(examples: int, template: Path, tmp_path: Path) -> None:
    """Against the manifest's sha256 every change is caught. Without the checksum (the header alone checked)
    the file is refused, or its header was read right: the tensors are those of the data flips alone."""
    rank_bytes = (template / "shards" / R1).read_bytes()
    header = 8 + struct.unpack("<Q", rank_bytes[:8])[0]
    shards = tmp_path / "shards"
    shutil.copytree(template / "shards", shards)
    good = ShardSet.open(template / "shards").load_rank(1)

    def check(flips: list[tuple[int, int]]) -> None:
        (shards / R1).write_bytes(damaged(rank_bytes, flips))
        shard_set = ShardSet.open(shards)
        with pytest.raises(TpshardError, match=R1):
            merge_shards(shard_set)
        try:
            loaded = shard_set.load_rank(1, checksum=False)
        except TpshardError as e:
            assert R1 in str(e)
            return
        assert loaded.keys() == good.keys()
        (tmp_path / "data flips only").write_bytes(damaged(rank_bytes, [(p, m) for p, m in flips if p >= header]))
        expected = load_file(tmp_path / "data flips only")
        assert all(torch.equal(bits(loaded[k]), bits(expected[k])) for k in good)  # (a flip may make a NaN)

    fuzz(examples, edits(len(rank_bytes), header, 3), check)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_flipped_bytes_in_a_manifest(examples: int, template: Path, tmp_path: Path) -> None:
    """A damaged manifest is refused, or merges to exactly the original tensors: the rank files' sha256 pin
    those down. What a flip can change unseen is what no checksum covers, the manifest's own values that
    stay valid: bookkeeping (iter_num's digits, say) and layer_norm_epsilon (1e-05 -> 1e-15)."""
    text = (template / "shards" / MANIFEST).read_bytes()
    shards = tmp_path / "shards"
    shutil.copytree(template / "shards", shards)
    original = merge_shards(ShardSet.open(template / "shards"))

    def check(flips: list[tuple[int, int]]) -> None:
        (shards / MANIFEST).write_bytes(damaged(text, flips))
        try:
            merged = merge_shards(ShardSet.open(shards))
        except TpshardError as e:
            assert str(shards) in str(e)
            return
        changed = {k for k, v in vars(merged.config).items() if v != getattr(original.config, k)}
        assert changed <= {"layer_norm_epsilon"}, changed
        assert all(torch.equal(merged.state_dict[k], v) for k, v in original.state_dict.items())

    fuzz(examples, edits(len(text), len(text), 3), check)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_arbitrary_bytes_as_any_input(examples: int, template: Path, tmp_path: Path) -> None:
    """Random bytes as a ckpt.pt, a dense .safetensors, a meta.pkl, a manifest, a rank file: refused."""
    from tpshard.tokenizer import load_meta_pkl

    shards = tmp_path / "shards"
    shutil.copytree(template / "shards", shards)
    good = (template / "shards" / MANIFEST).read_bytes()

    def check(blob: bytes) -> None:
        for name in ("x.pt", "x.safetensors"):
            with pytest.raises(TpshardError):
                load_checkpoint(write(tmp_path / name, blob))
        with pytest.raises(TpshardError):
            load_meta_pkl(write(tmp_path / "meta.pkl", blob))
        with pytest.raises(TpshardError):
            ShardSet.open(write(shards / MANIFEST, blob).parent)
        write(shards / MANIFEST, good)
        write(shards / R0, blob)
        with pytest.raises(TpshardError):
            ShardSet.open(shards).load_rank(0, checksum=False)

    fuzz(examples, st.binary(max_size=600), check)


# --- absurd sizes: refused at once, before any large allocation -----------------------------------------------

ENTRY = {"dtype": "F32", "data_offsets": [0, 64]}


def safetensors_bytes(header: dict, length: int | None = None) -> bytes:
    """A safetensors file with 64 bytes of data, whose header may lie about its own length."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * 64


def forged_rank_file(w: Path, header: dict, length: int | None = None) -> None:
    """Rank 0 replaced by a forged file, and re-signed, so that its header is what gets checked."""
    write(w / "shards" / R0, safetensors_bytes(header, length))
    resign(w, 0)


def expanded_model(path: Path) -> Path:
    """A few-KB ckpt.pt whose tensors claim 64 GB: each a single stored value, expanded (stride 0)."""
    config = GPTConfig(block_size=1024, vocab_size=1 << 16, n_layer=1, n_head=1, n_embd=1 << 16, bias=False)
    model = {name: torch.zeros(1).expand(*shape) for name, shape in dense_shapes(config).items()}
    return save(path, {"model": model, "model_args": model_args(config)})


def laughing_config(path: Path) -> Path:
    """A training config of 64 nested lists, each holding the next one twice: 2**64 values written out."""
    bomb: list = []
    for _ in range(64):
        bomb = [bomb, bomb]
    return save(path, nanogpt(config={"dataset": "x", "schedule": bomb}))


def long1(n: int) -> bytes:
    """The pickle opcode for an int of any size."""
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def forged_tensor(path: Path) -> Path:
    """A tensor of shape [2**40, 2**40] over a 15-element storage, written into the pickle by hand."""
    small = path.with_suffix(".small")
    torch.save({"t": torch.zeros(3, 5)}, small)
    reader, writer = torch._C.PyTorchFileReader(str(small)), torch._C.PyTorchFileWriter(str(path))
    for name in reader.get_all_records():
        record = reader.get_record(name)
        if name == "data.pkl":  # size (3, 5) -> (2**40, 2**40), stride (5, 1) -> (2**40, 1)
            record = record.replace(b"K\x03K\x05\x86", long1(2**40) * 2 + b"\x86")
            record = record.replace(b"K\x05K\x01\x86", long1(2**40) + b"K\x01\x86")
        if name not in (".data/serialization_id", ".format_version", ".storage_alignment", "version"):
            writer.write_record(name, record, len(record))  # (those the writer adds itself)
    writer.write_end_of_file()
    small.unlink()
    return path


def deflated_zeros(size: int, chunk: int = 16 << 20) -> bytes:
    """A raw deflate stream of `size` zero bytes, made in a fraction of a second: after a full flush the
    compressor forgets its history, so every further chunk compresses to the same bytes, repeated here."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (size // chunk - 1) + compressor.flush(zlib.Z_FINISH)


def zip_bomb(path: Path, size: int = 1 << 30) -> Path:
    """A torch-style archive whose data.pkl is deflated: 1 MB on disk, `size` bytes once inflated. Written
    by hand (zipfile would compress the gigabyte itself); the CRC is left 0, as torch inflates first."""
    records = [("bomb/data.pkl", 8, deflated_zeros(size), size), ("bomb/version", 0, b"3\n", 2)]
    local, central = b"", b""
    for name, method, data, inflated in records:
        crc = zlib.crc32(data) if method == 0 else 0
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, crc, len(data), inflated, len(name), 0)
        offset = struct.pack("<HHHII", 0, 0, 0, 0, len(local))
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + offset + name.encode()
        local += b"PK\x03\x04" + fields + name.encode() + data
    end = struct.pack("<HHHHIIH", 0, 0, len(records), len(records), len(central), len(local), 0)
    return write(path, local + central + b"PK\x05\x06" + end)


def hf_dir(folder: Path, **config: object) -> Path:
    folder.mkdir()
    write(folder / "config.json", json.dumps({"model_type": "gpt2", "n_embd": 32, "n_head": 4, **config}))
    write(folder / "model.safetensors", safetensors_bytes({"wte.weight": {**ENTRY, "shape": [16]}}))
    return folder


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(b"{")
        f.truncate(size)  # a hole: no disk used, but stat says `size` bytes
    return path


def absurd(w: Path, case: str) -> list:
    """Build the forged input of `case` in w; return the argv that reads it."""
    s = w / "shards"
    merge, split = ["merge", s, "-o", w / "m.pt"], lambda src: ["split", src, "--tp", 2, "-o", w / "o"]
    if case == "rank file header length 2**60":
        forged_rank_file(w, {"a": {**ENTRY, "shape": [16]}}, 2**60)
    elif case == "rank file tensor [2**40, 2**40]":
        forged_rank_file(w, {"a": {**ENTRY, "shape": [2**40, 2**40]}})
    elif case == "manifest tp_size 10**9":
        edit_manifest(w, set_key("tp_size", 10**9))
    elif case == "manifest n_layer 10**9":
        edit_manifest(w, lambda m: m["model_args"].update(n_layer=10**9))
        return ["reshard", s, "--tp", 4, "-o", w / "r"]
    elif case == "manifest n_head 10**9":
        edit_manifest(w, lambda m: m["model_args"].update(n_head=10**9, n_embd=10**9))
    elif case == "manifest tp_size 10**6 with 10**6 files":
        edit_manifest(w, lambda m: (m["model_args"].update(n_head=10**6, n_embd=10**6), m.update(files=[{}] * 10**6)))
    elif case == "manifest of 1 GB":
        sparse(s / MANIFEST, 1 << 30)
    elif case == "manifest nested 10**6 deep":
        write(s / MANIFEST, "[" * 10**6)
    elif case == "dense safetensors header length 2**60":
        return split(write(w / "d.safetensors", safetensors_bytes({"a": {**ENTRY, "shape": [16]}}, 2**60)))
    elif case == "dense safetensors tensor [2**40, 2**40]":
        return split(write(w / "d.safetensors", safetensors_bytes({"a": {**ENTRY, "shape": [2**40, 2**40]}})))
    elif case == "ckpt n_layer 10**9":
        return split(save(w / "layers.pt", nanogpt(model_args=args(n_layer=10**9))))
    elif case == "ckpt tensors claiming 64 GB":
        return split(expanded_model(w / "expanded.pt"))
    elif case == "ckpt tensor [2**40, 2**40] forged":
        return split(forged_tensor(w / "forged.pt"))
    elif case == "ckpt config of 2**64 values":
        return split(laughing_config(w / "laughs.pt"))
    elif case == "ckpt.pt holding a 1 GB deflated record":
        return split(zip_bomb(w / "bomb.pt"))
    elif case == "pytorch_model.bin holding a 1 GB deflated record":
        folder = hf_dir(w / "hf", vocab_size=1, n_layer=1)
        (folder / "model.safetensors").unlink()
        zip_bomb(folder / "pytorch_model.bin")
        return split(folder)
    elif case == "hf config n_layer 10**9":
        return split(hf_dir(w / "hf", vocab_size=1, n_layer=10**9))
    elif case == "hf config.json of 1 GB":
        folder = hf_dir(w / "hf", vocab_size=1, n_layer=1)
        sparse(folder / "config.json", 1 << 30)
        return split(folder)
    elif case == "hf config.json nested 10**6 deep":
        folder = hf_dir(w / "hf")
        write(folder / "config.json", "[" * 10**6)
        return split(folder)
    else:
        raise AssertionError(case)
    return merge


ABSURD = [
    "rank file header length 2**60",
    "rank file tensor [2**40, 2**40]",
    "manifest tp_size 10**9",
    "manifest n_layer 10**9",
    "manifest n_head 10**9",
    "manifest tp_size 10**6 with 10**6 files",
    "manifest of 1 GB",
    "manifest nested 10**6 deep",
    "dense safetensors header length 2**60",
    "dense safetensors tensor [2**40, 2**40]",
    "ckpt n_layer 10**9",
    "ckpt tensors claiming 64 GB",
    "ckpt tensor [2**40, 2**40] forged",
    "ckpt config of 2**64 values",
    "ckpt.pt holding a 1 GB deflated record",
    "pytorch_model.bin holding a 1 GB deflated record",
    "hf config n_layer 10**9",
    "hf config.json of 1 GB",
    "hf config.json nested 10**6 deep",
]
ADDRESS_SPACE = 3 << 30  # torch's import and a tiny split map about 1 GB of it
GROWTH = 200 << 20  # what a refusal may add to the process's peak memory


def test_absurd_sizes_fail_fast_within_a_memory_limit(template: Path, tmp_path: Path) -> None:
    """Each forged claim (a header of 2**60 bytes, a [2**40, 2**40] tensor, 10**9 layers or ranks, 64 GB of
    expanded tensors, a config of 2**64 values, a 1 GB manifest, a 1 MB zip inflating to 1 GB) is refused
    in under 2 s, without raising the process's peak memory by more than 200 MB, in a process that may not
    map more than 3 GB: checked before anything is allocated for it."""
    warm_up = ["split", template / "model" / "ckpt.pt", "--tp", 2, "-o", tmp_path / "warm-up"]  # imports, caches
    worlds, argvs = [], [warm_up]
    for i, case in enumerate(ABSURD):
        w = tmp_path / f"w{i}"
        shutil.copytree(template, w)
        argvs.append(absurd(w, case))
        worlds.append((case, w, snapshot(w)))

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    (code, *_, baseline), *results = run_driver(argvs, preexec=limit_memory)
    assert code == 0
    for (case, w, before), (code, out, err, seconds, peak) in zip(worlds, results, strict=True):
        assert code == 2 and err.count("\n") == 1 and out == "", (case, code, err)
        assert seconds < 2, (case, seconds)
        assert peak - baseline < GROWTH, (case, f"peak memory +{(peak - baseline) >> 20} MB")
        assert snapshot(w) == before, case
