"""Models bigger than memory: split, merge, reshard and verify hold about one tensor (verify: one block)
at a time, never the model.

- The streaming writers write the files the in-memory ones wrote: a ckpt.pt is torch.save's own file,
  byte for byte (files/torchzip.py); the dense safetensors and HF files hold the same tensors.
- verify's streamed models (runtime/streamed.py) compute exactly what the resident ones do, and its
  numerics, compared a chunk of positions at a time, are the figures of the whole comparison.
- Peak memory does not grow with the model: every command runs on two models, one with 4x the other's
  blocks (the largest tensor the same), each command in a fresh process forked from one that has
  imported tpshard and nothing more. What is measured is the kernel's own high-water mark of the
  process's resident memory (VmHWM, reset to the current RSS at the start): anonymous and file pages
  together, so an upper bound on the anonymous peak, and no sampling to miss a spike.
"""

import errno
import fcntl
import filecmp
import hashlib
import json
import os
import subprocess
import sys
import weakref
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tpshard.config import GPTConfig
from tpshard.convert import merge_shards, merge_to, merged_checkpoint, split_checkpoint
from tpshard.files import tensorfile, torchzip
from tpshard.files.checkpoint import model_args
from tpshard.files.hf import hf_state_dict, save_hf
from tpshard.files.nanogpt import nanogpt_dict, save_checkpoint
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.files.torchzip import Deferred, save_streamed
from tpshard.model import GPT
from tpshard.runtime import models, streamed
from tpshard.runtime.programs import Trace, trace
from tpshard.testing import random_weights
from tpshard.verify import numerics

CONFIG = GPTConfig(block_size=32, vocab_size=96, n_layer=4, n_head=6, n_embd=48, bias=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bounded") / "ckpt.pt"
    model = random_weights(GPT(CONFIG), seed=7)
    torch.save({"model": model.state_dict(), "model_args": model_args(CONFIG), "iter_num": 3}, path)
    return path


def split(ckpt: Path, out: Path, tp: int, pp: int = 1, vocab_parallel: bool = False) -> ShardSet:
    split_checkpoint(load_checkpoint(ckpt), tp, out, pp=pp, vocab_parallel=vocab_parallel)
    return ShardSet.open(out)


# --- the writers ------------------------------------------------------------------------------------


def torch_save(obj: object, path: Path) -> Path:
    with open(path, "wb") as f:  # a file object: the archive's folder is "archive", as save_streamed's
        torch.save(obj, f)
    return path


def test_a_streamed_archive_is_torch_saves_own_file(tmp_path: Path) -> None:
    """The same bytes as torch.save, tensors made only when written: tied (one record), half precision,
    a 0-d tensor among plain data, a view into a larger storage (written as its own bytes)."""
    weight, view = torch.randn(5, 3), torch.randn(4, 6)[1:3]
    plain = {"model": {"w": weight, "h": torch.randn(7).half(), "tied": weight, "v": view.clone()}}
    plain |= {"optimizer": None, "loss": torch.tensor(2.5), "config": {"lr": 1e-3, "steps": [1, 2], "name": "x"}}
    deferred = Deferred(torch.float32, (5, 3), weight.clone)
    made = {"w": deferred, "h": plain["model"]["h"], "tied": deferred, "v": Deferred(view.dtype, (2, 6), lambda: view)}
    save_streamed({**plain, "model": made}, tmp_path / "streamed.pt")
    assert filecmp.cmp(torch_save(plain, tmp_path / "saved.pt"), tmp_path / "streamed.pt", shallow=False)
    back = torch.load(tmp_path / "streamed.pt", weights_only=True)
    assert back["model"]["w"] is back["model"]["tied"] and torch.equal(back["model"]["v"], view)


def test_a_merged_ckpt_is_what_torch_save_wrote(ckpt: Path, tmp_path: Path) -> None:
    """merge's ckpt.pt, streamed from the rank files of a tp 3 x pp 2 set (in reused memory: merge_to;
    or each tensor in its own: merged_checkpoint), is torch.save's file of the merge in memory, byte for
    byte."""
    shards = split(ckpt, tmp_path / "s", tp=3, pp=2)
    eager = torch_save(nanogpt_dict(merge_shards(shards)), tmp_path / "eager.pt")
    merge_to(shards, tmp_path / "merged.pt", "pt")
    save_checkpoint(merged_checkpoint(shards), tmp_path / "library.pt")
    assert filecmp.cmp(eager, tmp_path / "merged.pt", shallow=False)
    assert filecmp.cmp(eager, tmp_path / "library.pt", shallow=False)


def test_memory_is_handed_back_only_where_it_was_freed(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """merge_to's tensors are made in two reused blocks: nothing is freed when one is let go, and no
    writer trims; tensors of their own (merged_checkpoint's) are trimmed after."""
    shards = split(ckpt, tmp_path / "s", tp=2)
    trimmed: list[int] = []
    monkeypatch.setattr(tensorfile, "trim_free_memory", trimmed.append)
    monkeypatch.setattr(torchzip, "trim_free_memory", trimmed.append)
    for fmt, name in (("pt", "m.pt"), ("safetensors", "m.safetensors"), ("hf", "hf")):
        merge_to(shards, tmp_path / name, fmt)
    assert trimmed == []
    save_checkpoint(merged_checkpoint(shards), tmp_path / "library.pt")
    save_hf(merged_checkpoint(shards), tmp_path / "library")
    assert len(trimmed) > 2 * CONFIG.n_layer


@pytest.mark.parametrize("writer", ["safetensors", "pt"])
def test_a_tensor_is_freed_before_its_memory_is_trimmed(writer: str, tmp_path: Path, monkeypatch) -> None:
    """The trim after a tensor is written finds it freed: no reference is left to it (made_ahead's
    included), else the trim could not hand its memory back."""
    made: list[weakref.ref] = []
    alive_at_trim: list[bool] = []

    def make() -> torch.Tensor:
        tensor = torch.rand(1000)
        made.append(weakref.ref(tensor))
        return tensor

    def trim(freed: int) -> None:
        alive_at_trim.append(made[len(alive_at_trim)]() is not None)

    monkeypatch.setattr(tensorfile, "trim_free_memory", trim)
    monkeypatch.setattr(torchzip, "trim_free_memory", trim)
    if writer == "safetensors":
        layout = [(f"t{i}", torch.float32, (1000,)) for i in range(3)]
        tensorfile.write_safetensors(tmp_path / "w.safetensors", layout, lambda _: make(), {}, sha256=False)
    else:
        deferred = {f"t{i}": Deferred(torch.float32, (1000,), make) for i in range(3)}
        save_streamed(deferred, tmp_path / "w.pt")
    assert alive_at_trim == [False, False, False]


@pytest.mark.parametrize("direct", ["taken", "refused at open", "refused at a write"])
def test_an_output_file_holds_the_tensors_bytes(direct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the writers write, through buffers (of 4 kB here: rows cross from one to the next, some are
    larger than one), is each tensor's row-major bytes, whatever its strides (transposed, cut, stepped,
    N-d, bfloat16, 0-d, empty), at any offset (after 3 bytes: a float's place in no buffer lines up), and
    its sha256 is the file's. With O_DIRECT, or without: a file system that refuses it when the file is
    opened, or only when it is written (where this file system takes it)."""
    if direct != "refused at open" and not takes_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}: no O_DIRECT here")
    monkeypatch.setattr(tensorfile, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(tensorfile, "DIRECT_BUFFER_BYTES", 4096)
    monkeypatch.setattr(tensorfile, "BUFFERS", 2)
    monkeypatch.setattr(tensorfile, "DIRECT_BYTES", 0)  # every file large
    if direct == "refused at open":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    elif direct == "refused at a write":
        real_writev = os.writev

        def writev(fd: int, buffers: list) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real_writev(fd, buffers)

        monkeypatch.setattr(os, "writev", writev)
    gen = torch.Generator().manual_seed(3)
    views = [
        torch.randn(300, 70, generator=gen).t(),  # an HF Conv1D weight: the blocked transpose
        torch.randn(5, 2000, generator=gen).t(),  # a transposed row larger than a buffer
        torch.randn(30, 40, generator=gen)[:, 5:17],  # a row-parallel cut
        torch.randn(3000, generator=gen)[::3],
        torch.randn(3, 5000, generator=gen)[:, ::2],
        torch.randn(2, 3, 700, generator=gen).transpose(0, 2),
        torch.randn(4000, generator=gen).to(torch.bfloat16).view(40, 100).t(),
        torch.randn(5000, generator=gen),  # contiguous, several buffers
        torch.tensor(3.0),
        torch.randn(0, 4),
    ]
    expected = b"".join(view.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for view in views)
    for offset in (b"", b"abc"):
        with tensorfile.OutputFile(tmp_path / "out", sha256=True) as out:
            out.write(offset)
            for view in views:
                out.write_tensor(view)
            assert out.tell() == len(offset + expected)
            direct_now = bool(fcntl.fcntl(out.fileno(), fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
            digest = out.close()
        assert (tmp_path / "out").read_bytes() == offset + expected
        assert digest == hashlib.sha256(offset + expected).hexdigest()
        assert direct_now == (direct == "taken")


def takes_o_direct(folder: Path) -> bool:
    """Whether a file in folder opens with O_DIRECT (not on macOS, nor on tmpfs before Linux 6.6)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(folder / "o_direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        (folder / "o_direct").unlink(missing_ok=True)
    return True


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts the open files in /proc/self/fd")
@pytest.mark.parametrize("failing", ["the buffers", "the writer thread"])
def test_an_output_file_that_cannot_start_leaves_no_file_open(
    failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    if failing == "the buffers":
        monkeypatch.setattr(tensorfile.mmap, "mmap", fail)
    else:
        monkeypatch.setattr(tensorfile.threading.Thread, "start", fail)
    before = open_fds()
    with pytest.raises(OSError, match="memory"):
        tensorfile.OutputFile(tmp_path / "out", sha256=True)
    assert open_fds() <= before


def test_an_output_file_that_failed_fails_every_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that failed on the writer thread is raised by the next write or by close(), and by every
    close() after: never None, which would read as a file written without its hash."""
    monkeypatch.setattr(tensorfile, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(tensorfile, "BUFFERS", 2)

    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", full)
    out = tensorfile.OutputFile(tmp_path / "out", sha256=True)
    with pytest.raises(OSError, match="No space"):
        out.write(os.urandom(3 * 4096))  # the first full buffer fails while the third is filled
        out.close()
    for _ in range(2):
        with pytest.raises(OSError, match="No space"):
            out.close()


@pytest.mark.parametrize("buffers", [0, 1, 2, 5])
def test_an_output_file_of_whole_buffers(buffers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that ends where a buffer does (or holds nothing) has no partial last buffer to write."""
    monkeypatch.setattr(tensorfile, "DIRECT_BUFFER_BYTES", 4096)
    monkeypatch.setattr(tensorfile, "BUFFERS", 2)
    monkeypatch.setattr(tensorfile, "DIRECT_BYTES", 0)
    data = os.urandom(4096 * buffers)
    with tensorfile.OutputFile(tmp_path / "out", sha256=True) as out:
        out.write(data)
        assert out.close() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out").read_bytes() == data


def test_dense_safetensors_and_hf_hold_what_the_in_memory_writers_held(cli, ckpt: Path, tmp_path: Path) -> None:
    split(ckpt, tmp_path / "s", tp=2, vocab_parallel=True)
    merged = merge_shards(ShardSet.open(tmp_path / "s"))
    assert cli("merge", tmp_path / "s", "-o", tmp_path / "m.safetensors", "--format", "safetensors")[0] == 0
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(merged.state_dict) - {"lm_head.weight"}
        assert all(torch.equal(f.get_tensor(k), merged.state_dict[k]) for k in f.keys())  # noqa: SIM118
    merge_to(ShardSet.open(tmp_path / "s"), tmp_path / "hf", "hf")
    save_hf(merged_checkpoint(ShardSet.open(tmp_path / "s")), tmp_path / "library")
    expected = hf_state_dict(merged)
    for hf in ("hf", "library"):
        with safe_open(str(tmp_path / hf / "model.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(expected)
            assert all(torch.equal(f.get_tensor(k), expected[k]) for k in expected)
    assert any(k.endswith(".bias") for k in expected)  # the zero biases of a bias-free model


# --- verify -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp", "vocab_parallel"), [(2, 1, False), (3, 2, True), (1, 4, False)])
def test_streamed_models_compute_what_the_resident_ones_do(
    ckpt: Path, tmp_path: Path, tp: int, pp: int, vocab_parallel: bool
) -> None:
    shards = split(ckpt, tmp_path / "s", tp=tp, pp=pp, vocab_parallel=vocab_parallel)
    dense = load_checkpoint(ckpt)
    idx = torch.randint(CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    pairs = [(models.simulated_model(shards), streamed.simulated_model(shards))]
    for dtype in (None, torch.bfloat16):
        resident = models.dense_model(dense, dtype=dtype)
        pairs += [(resident, streamed.dense_model(source, dtype=dtype)) for source in (dense, shards)]
    for resident, lazy in pairs:
        want, got = trace(resident, idx, 6, 5), trace(lazy, idx, 6, 5)
        assert all(torch.equal(a, b) for a, b in zip(want.hidden, got.hidden, strict=True))
        for field in ("logits", "tokens", "top2"):
            assert torch.equal(getattr(want, field), getattr(got, field)), field
        assert (want.forwards, want.stage_collectives) == (got.forwards, got.stage_collectives)
        assert all(p.device.type == "meta" for p in lazy.transformer.h.parameters())  # let go after the forward


def test_numerics_a_chunk_at_a_time_are_the_whole_comparisons(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)

    def traces(logits: list[torch.Tensor]) -> list[Trace]:
        hidden = [torch.zeros(t.shape[0], t.shape[1], 4) for t in logits]
        return [Trace([h], t, torch.zeros(t.shape[0], 0, dtype=torch.long), torch.zeros(t.shape[0], 0, 2), [])
                for h, t in zip(hidden, logits, strict=True)]

    dense = [torch.randn(3, 7, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)]
    sharded = [t + 1e-5 * torch.randn(t.shape, generator=gen) for t in dense]
    sharded[1][1, 2, 3] = float("nan")
    dense[1][0, 4, :] = float("inf")
    tolerance = (1e-4, 1e-5, "given")
    monkeypatch.setattr(numerics, "ROWS", 1 << 30)
    whole = numerics.compare(traces(dense), traces(sharded), tolerance, torch.float32)
    monkeypatch.setattr(numerics, "ROWS", 3)
    chunked = numerics.compare(traces(dense), traces(sharded), tolerance, torch.float32)
    assert asdict(chunked) == asdict(whole)
    assert whole.dense_nonfinite is not None and whole.sharded_nonfinite is not None and whole.kl_mean


# --- peak memory --------------------------------------------------------------------------------------

# Run in a fresh interpreter: import what the commands use, then fork one child per command. Each child
# resets its high-water mark to its current RSS (clear_refs 5), samples its anonymous memory every
# millisecond on a thread, runs tpshard's main() and reports how far above its start both peaks went.
HARNESS = """
import json, os, sys, threading, time
import torch
import tpshard.cli.main, tpshard.convert, tpshard.verify.run, tpshard.files.hf, tpshard.runtime.streamed
def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                if k in ("VmHWM", "VmRSS", "RssAnon")}
results = []
for argv in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = status()
        anon = [start["RssAnon"]]
        def sample():
            while True:
                anon[0] = max(anon[0], status()["RssAnon"])
                time.sleep(0.001)
        threading.Thread(target=sample, daemon=True).start()
        sys.argv = ["tpshard", *argv]
        try:
            tpshard.cli.main.main()
            code = 0
        except SystemExit as e:
            code = e.code
        end = status()
        anon = max(anon[0], end["RssAnon"]) - start["RssAnon"]
        os.write(write, json.dumps({"code": code, "rss": end["VmHWM"] - start["VmRSS"], "anon": anon}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        results.append(json.loads(f.read()))
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


def peaks(commands: list[list[str]]) -> list[dict[str, int]]:
    """Each command's peak RSS (VmHWM) and anonymous memory (sampled) above what it started with, bytes."""
    done = subprocess.run(
        [sys.executable, "-c", HARNESS, json.dumps(commands)], capture_output=True, text=True, check=True
    )
    results = json.loads(done.stdout.splitlines()[-1])
    assert [r["code"] for r in results] == [0] * len(commands), done.stderr
    return results


def commands(folder: Path) -> dict[str, list[str]]:
    f = lambda name: str(folder / name)  # noqa: E731
    check = ["--batch", "1", "--random-tokens", "8", "--tokens", "2"]
    return {
        "split": ["split", f("ckpt.pt"), "--tp", "2", "-o", f("s")],
        "merge pt": ["merge", f("s"), "-o", f("m.pt")],
        "merge safetensors": ["merge", f("s"), "-o", f("m.safetensors"), "--format", "safetensors"],
        "merge hf": ["merge", f("s"), "-o", f("hf"), "--format", "hf"],
        "merge dcp": ["merge", f("s"), "-o", f("dcp"), "--format", "dcp"],
        "reshard": ["reshard", f("s"), "--tp", "4", "--pp", "2", "-o", f("r")],
        "verify": ["verify", f("s"), "--against", f("ckpt.pt"), *check],
        "verify, merged in memory": ["verify", f("r"), *check],
    }


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    """Every streaming command on a model of 6 blocks and one of 24 (about 19 and 76 MB): the larger
    model's anonymous peak is above the smaller's by less than a quarter of the 57 MB between them, and
    its RSS peak by less than half, where holding the model (or a copy of it) would put either 57 MB or
    more above. (RSS also holds file pages: the last few hundred kB read of each rank file stay mapped,
    a larger model's files fill more of that than a smaller's, up to a fixed amount per file.)"""
    measured, size = {}, {}
    for layers in (6, 24):
        config = GPTConfig(block_size=64, vocab_size=256, n_layer=layers, n_head=4, n_embd=256, bias=True)
        folder = tmp_path / f"l{layers}"
        folder.mkdir()
        model = random_weights(GPT(config), seed=layers)
        size[layers] = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.save({"model": model.state_dict(), "model_args": model_args(config)}, folder / "ckpt.pt")
        del model
        run = commands(folder)
        measured[layers] = dict(zip(run, peaks(list(run.values())), strict=True))
    between = size[24] - size[6]
    assert between > 50e6
    for kind, share in (("anon", 4), ("rss", 2)):
        growth = {name: measured[24][name][kind] - measured[6][name][kind] for name in measured[6]}
        shown = {name: f"{g / 1e6:.1f} MB" for name, g in growth.items()}
        assert all(g < between / share for g in growth.values()), (kind, shown)
