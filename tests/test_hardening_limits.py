"""Hardening II: options at and past their limits, outputs aimed at inputs, and weights that cannot generate.

The contract (`refused`): exit 2, one line `tpshard: error: ...` on stderr naming the option (or the tensor),
nothing on stdout, no traceback, and every input byte for byte as before. Values at the limits that are
valid (a temperature so small that it overflows, a top-k beyond the vocabulary, the largest seed) must
simply work, as documented in --help.
"""

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG, write_nanogpt_checkpoint
from test_hardening import one_line
from typer.testing import CliRunner

from tpshard.cli.app import app
from tpshard.convert import split_checkpoint
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.paths import load_checkpoint
from tpshard.generation import SEED_MAX, Sampling, TokenPicker
from tpshard.verify.run import MAX_BATCH

R1 = "rank1-of-2.safetensors"
BLOCK = BIAS_CONFIG.block_size
CUDA = torch.cuda.device_count()


# --- the contract ------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, object]:
    """Every entry under the roots: a link's target, 'dir', or the file's sha256."""
    tree: dict[str, object] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                if path.is_symlink():
                    tree[str(path)] = f"link -> {os.readlink(path)}"
                elif path.is_dir():
                    tree[str(path)] = "dir"
                else:
                    tree[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def refused(cli, roots: list[Path], *args: object, culprit: str) -> str:
    """Run tpshard in-process; check the one-line refusal naming the culprit and that nothing under roots
    changed. Returns stderr."""
    before = snapshot(*roots)
    code, out, err = cli(*args)
    assert "Traceback" not in err, err
    one_line(code, out, err)
    assert culprit in err, err
    assert snapshot(*roots) == before
    return err


# --- the world: a checkpoint with meta.pkl, and its 2-way shard set --------------------------------------


@pytest.fixture(scope="module")
def world(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/model/{ckpt.pt, meta.pkl} and root/shards (tp 2, meta.pkl shipped). The tests below only refuse
    to write into it, and check that they did not: read-only."""
    root = tmp_path_factory.mktemp("limits")
    shutil.copytree(bias_ckpt.parent, root / "model")
    ckpt = root / "model" / "ckpt.pt"
    split_checkpoint(load_checkpoint(ckpt), 2, root / "shards", tokenizer_file=ckpt.parent / "meta.pkl")
    return root


@pytest.fixture
def w(world: Path, tmp_path: Path) -> Path:
    """A copy of the world of this test's own, for the tests that aim outputs at it."""
    shutil.copytree(world, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


# --- 1. no output replaces an input ----------------------------------------------------------------------


def link(tmp: Path, name: str, target: Path) -> Path:
    (tmp / name).symlink_to(target)
    return tmp / name


# name -> (world, tmp) -> (verify's arguments before --html, the --html path, what the error must name)
HTML_OVER_INPUTS: dict[str, Callable[[Path, Path], tuple[list, Path]]] = {
    "the --against checkpoint": lambda w, t: (["--against", w / "model" / "ckpt.pt"], w / "model" / "ckpt.pt"),
    "the manifest": lambda w, t: ([], w / "shards" / MANIFEST),
    "a rank file": lambda w, t: ([], w / "shards" / R1),
    "the tokenizer in the set": lambda w, t: ([], w / "shards" / "meta.pkl"),
    "the shard directory": lambda w, t: ([], w / "shards"),
    "the shard directory, with a trailing dot": lambda w, t: ([], w / "shards" / "."),
    "the --tokenizer file": lambda w, t: (
        ["--prompt", "ab", "--tokenizer", w / "model" / "meta.pkl"],
        w / "model" / "meta.pkl",
    ),
    "a file of the --against directory": lambda w, t: (["--against", w / "model"], w / "model" / "ckpt.pt"),
    "the --against directory": lambda w, t: (["--against", w / "model"], w / "model"),
    "a symlink to the checkpoint": lambda w, t: (
        ["--against", w / "model" / "ckpt.pt"],
        link(t, "report.html", w / "model" / "ckpt.pt"),
    ),
    "a symlink to the manifest": lambda w, t: ([], link(t, "report.html", w / "shards" / MANIFEST)),
    "a symlink to the shard directory": lambda w, t: ([], link(t, "report", w / "shards")),
    "a rank file through a symlinked directory": lambda w, t: ([], link(t, "s", w / "shards") / R1),
    "the checkpoint, up and down again": lambda w, t: (
        ["--against", w / "model" / "ckpt.pt"],
        w / "shards" / ".." / "model" / "ckpt.pt",
    ),
}


@pytest.mark.parametrize("case", HTML_OVER_INPUTS)
def test_html_never_replaces_an_input(case: str, w: Path, tmp_path: Path, cli) -> None:
    """Refused before verify runs; every input (and every link to one) byte for byte as before."""
    before_args, page = HTML_OVER_INPUTS[case](w, tmp_path)
    err = refused(cli, [tmp_path], "verify", w / "shards", *before_args, "--html", page, culprit="--html")
    assert "input" in err


def test_html_is_refused_when_the_shards_are_named_through_a_symlink(w: Path, tmp_path: Path, cli) -> None:
    shards = link(tmp_path, "s", w / "shards")
    refused(cli, [tmp_path], "verify", shards, "--html", w / "shards" / R1, culprit="--html")


def test_html_into_a_missing_directory_is_refused_before_the_run(w: Path, tmp_path: Path, cli) -> None:
    refused(cli, [tmp_path], "verify", w / "shards", "--html", tmp_path / "no" / "r.html", culprit="--html")


def test_html_is_written_whole(world: Path, tmp_path: Path, cli) -> None:
    page = tmp_path / "report.html"
    page.write_text("the previous report")
    code, _, err = cli("verify", world / "shards", "--tokens", 1, "--random-tokens", 4, "--html", page)
    assert code == 0, err
    assert page.read_text().startswith("<!DOCTYPE html>") and "PASS" in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left beside it


def test_html_that_fails_half_way_leaves_the_old_file(
    world: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up in the middle of the page: one line, the previous report untouched, no temporary."""
    page = tmp_path / "report.html"
    page.write_text("the previous report")
    write_text = Path.write_text

    def full_disk(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if not self.name.startswith(".report.html."):
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, out, err = cli("verify", world / "shards", "--tokens", 1, "--random-tokens", 4, "--html", page)
    assert code == 2 and "PASS" in out  # the report itself was printed before the page was written
    assert err.startswith("tpshard: error: ") and err.count("\n") == 1, err
    assert "writing failed" in err and "No space left on device" in err and "unchanged" in err, err
    assert page.read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# --- 2. options at and past their limits ------------------------------------------------------------------

GENERATE = ["--max-new-tokens", 3, "--prompt", "ab"]
NO_CUDA = "no CUDA device" if not CUDA else f"only {CUDA} CUDA device"

# name -> (source "ckpt" or "shards", arguments, what the error must name, and say)
BAD_GENERATE: dict[str, tuple[str, list, str, str]] = {
    "device cuda:99 dense": ("ckpt", ["--device", "cuda:99"], "--device cuda:99", NO_CUDA),
    "device cuda:99 simulated": ("shards", ["--device", "cuda:99"], "--device cuda:99", NO_CUDA),
    "device cuda:99 distributed": (
        "shards",
        ["--mode", "distributed", "--device", "cuda:99"],
        "--device cuda:99",
        "cpu or cuda",
    ),
    "device index beyond int64": ("ckpt", ["--device", f"cuda:{10**20}"], "--device", NO_CUDA),
    "device index beyond int64, simulated": ("shards", ["--device", f"cuda:{10**20}"], "--device", NO_CUDA),
    "device tpu distributed": ("shards", ["--mode", "distributed", "--device", "tpu"], "--device tpu", "cpu or cuda"),
    "temperature nan": ("ckpt", ["--temperature", "nan"], "--temperature nan", "finite"),
    "temperature inf": ("ckpt", ["--temperature", "inf"], "--temperature inf", "finite"),
    "temperature -inf": ("ckpt", ["--temperature", "-inf"], "--temperature -inf", "finite"),
    "temperature nan, greedy": ("ckpt", ["--temperature", "nan", "--greedy"], "--temperature nan", "finite"),
    "temperature 0": ("ckpt", ["--temperature", 0], "--temperature", "--greedy"),
    "temperature negative": ("ckpt", ["--temperature", -0.5], "--temperature", "above 0"),
    "seed 2**64": ("ckpt", ["--seed", SEED_MAX + 1], f"--seed {SEED_MAX + 1}", "2**64 - 1"),
    "seed 99999999999999999999": ("ckpt", ["--seed", 99999999999999999999], "--seed", "2**64 - 1"),
    "seed -1": ("ckpt", ["--seed", -1], "--seed -1", "between 0 and"),
    "seed -2**63": ("shards", ["--seed", -(2**63)], "--seed", "between 0 and"),
    "top-k negative": ("ckpt", ["--top-k", -1], "--top-k", "greater than or equal to 0"),
    "max-new-tokens 0": ("ckpt", ["--max-new-tokens", 0], "--max-new-tokens", "greater than or equal to 1"),
    "num-samples 0": ("ckpt", ["--num-samples", 0], "--num-samples", "greater than or equal to 1"),
    "nproc 0": ("shards", ["--nproc", 0], "--nproc 0", "at least 1"),
    "nproc -1 distributed": ("shards", ["--mode", "distributed", "--nproc", -1], "--nproc -1", "at least 1"),
    "nproc 0 dense": ("ckpt", ["--nproc", 0], "--nproc 0", "at least 1"),
}


def source(world: Path, kind: str) -> Path:
    return world / "model" / "ckpt.pt" if kind == "ckpt" else world / "shards"


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_generate_refuses_an_option_past_its_limit(case: str, world: Path, cli) -> None:
    kind, args, culprit, says = BAD_GENERATE[case]
    err = refused(cli, [world], "generate", source(world, kind), *GENERATE, *args, culprit=culprit)
    assert says in err, err


def test_generate_refuses_two_cuda_devices_it_does_not_have(world: Path, cli) -> None:
    if CUDA >= 2:
        pytest.skip("this machine has the 2 CUDA devices a tp-2 distributed run needs")
    args = ["--mode", "distributed", "--device", "cuda"]
    assert "2 CUDA devices" in refused(cli, [world], "generate", world / "shards", *GENERATE, *args, culprit="--device")


def generate_text(cli, src: Path, *args: object) -> str:
    code, out, err = cli("generate", src, "--max-new-tokens", 12, "--prompt", "ab", *args)
    assert code == 0 and "Traceback" not in err, err
    return out


@pytest.mark.parametrize("temperature", ["1e-40", "1e-45", "1e-300", "5e-324"])
@pytest.mark.parametrize("kind", ["ckpt", "shards"])
def test_a_tiny_temperature_takes_the_most_likely_token(temperature: str, kind: str, world: Path, cli) -> None:
    """As --help says: logits / temperature overflows float32, so the pick is greedy's, not NaN."""
    src = source(world, kind)
    assert generate_text(cli, src, "--temperature", temperature) == generate_text(cli, src, "--greedy")


@pytest.mark.parametrize(
    "args",
    [
        ["--top-k", 10**12],  # beyond the vocabulary: all of it
        ["--temperature", "1e300"],  # the other limit: uniform
        ["--seed", SEED_MAX],
        ["--seed", 0],
        ["--max-new-tokens", 3 * BLOCK],  # beyond block_size: the window slides, as nanoGPT's does
    ],
    ids=str,
)
def test_generate_at_the_limits_works(args: list, world: Path, cli) -> None:
    assert generate_text(cli, world / "model" / "ckpt.pt", *args).startswith("ab")


def test_token_picker_takes_the_limit_row_by_row() -> None:
    """Rows whose scaled logits overflow (to +inf, or all to -inf) take their argmax; the others sample."""
    picker = TokenPicker(Sampling(temperature=1e-40, top_k=None, seed=0))
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -3.0, -4.0], [-2.0, -1.0, -3.0]])
    assert picker(logits).tolist() == [1, 1, 1]
    mixed = TokenPicker(Sampling(temperature=1e-40, top_k=None, seed=0))
    tiny = torch.tensor([[1.0, 3.0, 2.0], [1e-42, 0.0, 0.0]])  # the second row stays finite: sampled
    assert mixed(tiny)[0] == 1


VERIFY = ["--tokens", 1, "--random-tokens", 4]

# name -> (arguments, what the error must name, and say)
BAD_VERIFY: dict[str, tuple[list, str, str]] = {
    "seed 99999999999999999999": (["--seed", 99999999999999999999], "--seed", "2**64 - 1"),
    "seed 2**64": (["--seed", SEED_MAX + 1], "--seed", "2**64 - 1"),
    "seed -1": (["--seed", -1], "--seed -1", "between 0 and"),
    "batch 1000000000": (["--batch", 10**9], "--batch 1000000000", f"between 1 and {MAX_BATCH}"),
    "batch past the maximum": (["--batch", MAX_BATCH + 1], f"--batch {MAX_BATCH + 1}", f"between 1 and {MAX_BATCH}"),
    "batch 0": (["--batch", 0], "--batch 0", "between 1 and"),
    "tokens 1000000000": (["--tokens", 10**9], "--tokens 1000000000", f"block_size {BLOCK}"),
    "tokens past block_size": (["--tokens", BLOCK + 1], f"--tokens {BLOCK + 1}", f"block_size {BLOCK}"),
    "tokens past block_size, distributed": (
        ["--mode", "distributed", "--tokens", BLOCK + 1],
        f"--tokens {BLOCK + 1}",
        "block_size",
    ),
    "tokens -1": (["--tokens", -1], "--tokens -1", "0 or more"),
    "random-tokens 0": (["--random-tokens", 0], "--random-tokens 0", "at least 1"),
    "random-tokens 10**20": (["--random-tokens", 10**20], "--random-tokens", "block_size"),
    "atol nan": (["--atol", "nan"], "--atol nan", "finite"),
    "atol inf": (["--atol", "inf"], "--atol inf", "finite"),
    "rtol negative": (["--rtol", -1], "--rtol", "0 or more"),
    "atol beyond a double": (["--atol", "1e400"], "--atol", "finite"),
}


@pytest.mark.parametrize("case", BAD_VERIFY)
def test_verify_refuses_an_option_past_its_limit(case: str, world: Path, cli) -> None:
    args, culprit, says = BAD_VERIFY[case]
    err = refused(cli, [world], "verify", world / "shards", *VERIFY, *args, culprit=culprit)
    assert says in err, err


@pytest.mark.parametrize(
    "args",
    [["--tokens", BLOCK], ["--tokens", 0], ["--seed", SEED_MAX], ["--batch", MAX_BATCH, "--random-tokens", 2]],
    ids=str,
)
def test_verify_at_the_limits_works(args: list, world: Path, cli) -> None:
    code, out, err = cli("verify", world / "shards", "--tokens", 1, "--random-tokens", 4, *args)
    assert code == 0 and "PASS" in out, err


def help_text(command: str) -> str:
    """--help as one line of words: rich's panel borders and line breaks taken out."""
    text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).stdout
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def test_help_documents_the_limits() -> None:
    generate, verify = help_text("generate"), help_text("verify")
    assert "takes the most likely token, as --greedy does" in generate
    assert "0 to 2**64-1" in generate and "0 to 2**64-1" in verify
    assert f"at most {MAX_BATCH}" in verify and "at most the model's block_size" in verify
    assert "never over an input" in verify


@pytest.mark.parametrize("tp", [0, -1])
@pytest.mark.parametrize("kind", ["checkpoint", "shard set", "rank file"])
def test_inspect_refuses_a_tp_below_1(tp: int, kind: str, world: Path, cli) -> None:
    shards = world / "shards"
    path = {"checkpoint": world / "model" / "ckpt.pt", "shard set": shards, "rank file": shards / R1}
    err = refused(cli, [world], "inspect", path[kind], "--tp", tp, culprit=f"--tp {tp}: must be at least 1")
    if kind == "checkpoint":  # word for word what split says
        assert err == refused(cli, [world], "split", path[kind], "--tp", tp, "-o", world / "out", culprit="--tp")


# --- 3. weights that cannot generate ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder (ckpt.pt, meta.pkl) to copy and damage."""
    return write_nanogpt_checkpoint(tmp_path_factory.mktemp("base"), optimizer=False).parent


def damaged(base: Path, tmp: Path, change: Callable[[dict], None]) -> Path:
    folder = tmp / "model"
    shutil.copytree(base, folder)
    ckpt = torch.load(folder / "ckpt.pt", weights_only=True)
    change(ckpt["model"])
    torch.save(ckpt, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def poke(name: str, value: float, where: tuple = (0,)) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        tensor = state[name].clone()
        tensor[where] = value
        state[name] = tensor

    return change


def cast(name: str, dtype: torch.dtype) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[name] = state[name].to(dtype)

    return change


C_FC, C_PROJ_BIAS = "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_proj.bias"

# name -> (change, how it runs: dense / simulated / distributed (the file split first), extra arguments,
# what the error must say)
BAD_WEIGHTS: dict[str, tuple[Callable[[dict], None], str, list, list[str]]] = {
    "NaN, dense": (poke(C_FC, float("nan"), (3, 5)), "dense", [], [C_FC, "1 NaN", "float32"]),
    "NaN, dense, greedy": (poke(C_FC, float("nan"), (3, 5)), "dense", ["--greedy"], [C_FC, "NaN"]),
    "inf, dense": (poke(C_PROJ_BIAS, float("inf")), "dense", [], [C_PROJ_BIAS, "1 infinite"]),
    "-inf, dense": (poke(C_PROJ_BIAS, -float("inf")), "dense", [], [C_PROJ_BIAS, "infinite"]),
    "NaN, simulated": (poke(C_FC, float("nan"), (3, 5)), "simulated", [], [C_FC, "NaN"]),
    "inf, merged dense": (poke(C_PROJ_BIAS, float("inf")), "dense", ["--mode", "dense"], [C_PROJ_BIAS]),
    "beyond float16's range under --dtype float16": (
        poke(C_FC, 1e6, (0, 0)),
        "dense",
        ["--dtype", "float16"],
        [C_FC, "infinite", "--dtype float16 too narrow"],
    ),
    "mixed dtypes (float16 in float32)": (
        cast("transformer.h.1.mlp.c_proj.weight", torch.float16),
        "dense",
        [],
        ["mixed dtypes", "float16", "float32", "transformer.h.1.mlp.c_proj.weight"],
    ),
    "mixed dtypes (bfloat16 in float32)": (
        cast("transformer.ln_f.weight", torch.bfloat16),
        "dense",
        [],
        ["mixed dtypes", "bfloat16", "transformer.ln_f.weight"],
    ),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_generate_refuses_weights_that_cannot_generate(case: str, base: Path, tmp_path: Path, cli) -> None:
    change, runs, args, says = BAD_WEIGHTS[case]
    ckpt = damaged(base, tmp_path, change)
    src = ckpt
    if runs == "simulated" or "--mode" in args:
        src = tmp_path / "shards"
        split_checkpoint(load_checkpoint(ckpt), 2, src, tokenizer_file=ckpt.parent / "meta.pkl")
    err = refused(cli, [tmp_path], "generate", src, *GENERATE, *args, culprit=says[0])
    for part in says[1:]:
        assert part in err, err


def test_distributed_generate_names_the_bad_tensor_and_its_rank(base: Path, tmp_path: Path, cli) -> None:
    ckpt = damaged(base, tmp_path, poke(C_FC, float("nan"), (3, 5)))
    split_checkpoint(load_checkpoint(ckpt), 2, tmp_path / "shards", tokenizer_file=ckpt.parent / "meta.pkl")
    args = ["--mode", "distributed", "--device", "cpu"]
    err = refused(cli, [tmp_path], "generate", tmp_path / "shards", *GENERATE, *args, culprit=C_FC)
    assert "rank " in err and "NaN" in err


def overflowing_float16(state: dict) -> None:
    """Finite float16 weights whose activations overflow: 60000 x a LayerNorm'd row is far beyond 65504."""
    for name in list(state):
        state[name] = state[name].half()
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"):
        state[name] = (state[name].float().sign() * 60000).half()


@pytest.mark.parametrize("args", [[], ["--greedy"]], ids=["sampled", "greedy"])
def test_generate_stops_at_logits_that_overflow(args: list, base: Path, tmp_path: Path, cli) -> None:
    """Every weight finite, the activations not: one error line after the status line, not a traceback
    from torch.multinomial, nor tokens picked from NaN; float32 runs it."""
    ckpt = damaged(base, tmp_path, overflowing_float16)
    code, _, err = cli("generate", ckpt, *GENERATE, *args)
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("tpshard: error: ") and "NaN or infinite" in last and "--dtype float32" in last, err
    assert len(err.splitlines()) == 2, err  # the status line ("dense on cpu (float16) ..."), then the error
    assert generate_text(cli, ckpt, *args, "--dtype", "float32").startswith("ab")
