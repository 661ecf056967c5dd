"""`tpshard generate`, dense and simulated: stdout holds only the text, seeds reproduce it, streaming
decodes UTF-8 split across tokens, bad input is one line with exit code 2."""

import base64
import pickle
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tpshard.cli.app import app
from tpshard.cli.generate import SEPARATOR, _stream
from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.errors import TpshardError
from tpshard.files.checkpoint import model_args
from tpshard.files.paths import load_checkpoint
from tpshard.model import GPT
from tpshard.testing import random_weights
from tpshard.tokenizer import load_tiktoken_file

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CONFIG = GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=2, n_head=4, n_embd=32, bias=True)


def write_checkpoint(folder: Path, config: GPTConfig = CONFIG, seed: int = 0) -> Path:
    """A nanoGPT ckpt.pt (train.py's dict) and a char-level meta.pkl (prepare.py's) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = random_weights(GPT(config), seed=seed)
    ckpt = {
        "model": model.state_dict(),
        "optimizer": {},
        "model_args": model_args(config),
        "iter_num": 10,
        "best_val_loss": torch.tensor(3.0),
        "config": {"dataset": "tiny"},
    }
    torch.save(ckpt, folder / "ckpt.pt")
    chars = CHARS[: config.vocab_size]
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return folder / "ckpt.pt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def shards(ckpt: Path) -> Path:
    split_checkpoint(load_checkpoint(ckpt), 2, ckpt.parent / "tp2", tokenizer_file=ckpt.parent / "meta.pkl")
    return ckpt.parent / "tp2"


def generate(*args: object) -> str:
    """stdout of an in-process `tpshard generate` (stderr kept apart by the runner)."""
    result = CliRunner().invoke(app, ["generate", *map(str, args)])
    if result.exception:
        raise result.exception
    assert result.exit_code == 0, result.stderr
    return result.stdout


def cli_error(*args: object) -> str:
    result = CliRunner().invoke(app, ["generate", *map(str, args)])
    assert isinstance(result.exception, TpshardError), result.output
    return str(result.exception)


def test_stdout_is_the_prompt_its_continuation_and_the_separator(ckpt: Path) -> None:
    """A real process: the text streams to stdout, status to stderr."""
    run = subprocess.run(
        [sys.executable, "-m", "tpshard", "generate", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ROMEO:") and run.stdout.endswith(f"\n{SEPARATOR}\n")
    text = run.stdout.removeprefix("ROMEO:").removesuffix(f"\n{SEPARATOR}\n")
    assert len(text) == 30 and set(text) <= set(CHARS)  # char-level: one character per token
    assert "tokens/s" in run.stderr and "ROMEO" not in run.stderr


def test_same_seed_same_text(ckpt: Path) -> None:
    first, again = (generate(ckpt, "--max-new-tokens", 40, "--seed", 5) for _ in range(2))
    assert first == again
    assert generate(ckpt, "--max-new-tokens", 40, "--seed", 6) != first


def test_greedy_ignores_the_seed(ckpt: Path) -> None:
    texts = {generate(ckpt, "--greedy", "--max-new-tokens", 40, "--seed", seed) for seed in (1, 2)}
    assert len(texts) == 1


def test_samples_follow_one_rng_stream(ckpt: Path) -> None:
    both = generate(ckpt, "--num-samples", 2, "--max-new-tokens", 20, "--prompt", "A")
    first, second, rest = both.split(f"\n{SEPARATOR}\n")
    assert rest == "" and first.startswith("A") and second.startswith("A") and first != second
    assert generate(ckpt, "--max-new-tokens", 20, "--prompt", "A") == first + f"\n{SEPARATOR}\n"


def test_default_prompt_is_a_newline_and_a_prompt_file_works(ckpt: Path, tmp_path: Path) -> None:
    assert generate(ckpt, "--max-new-tokens", 5).startswith("\n")
    (tmp_path / "prompt.txt").write_text("To be, or not")
    assert generate(ckpt, "--prompt-file", tmp_path / "prompt.txt", "--max-new-tokens", 5).startswith("To be, or not")


@pytest.mark.parametrize("sampling", [["--greedy"], ["--seed", "11", "--top-k", "5"]], ids=["greedy", "sampled"])
def test_shards_print_the_dense_text(ckpt: Path, shards: Path, sampling: list[str]) -> None:
    dense = generate(ckpt, *sampling, "--max-new-tokens", 60, "--num-samples", 2)  # 60 > block_size: crops
    assert generate(shards, *sampling, "--max-new-tokens", 60, "--num-samples", 2) == dense  # simulated
    assert generate(shards, "--mode", "dense", *sampling, "--max-new-tokens", 60, "--num-samples", 2) == dense


def test_stats_report_counted_sync_points(shards: Path) -> None:
    result = CliRunner().invoke(app, ["generate", str(shards), "--stats", "--max-new-tokens", "4", "--prompt", "AB"])
    assert result.exit_code == 0
    assert "4 per forward" in result.stderr  # 2 sync points x 2 blocks, counted by CountingCollectives
    assert "tokens/s" in result.stderr and "prefill" in result.stderr and SEPARATOR not in result.stderr


def test_streaming_decodes_characters_split_across_tokens(tmp_path: Path, capsysbinary) -> None:
    em_dash = "—".encode()  # 3 bytes
    ranks = [bytes([b]) for b in range(256)] + [em_dash[:2], b"ab"]
    (tmp_path / "t.tiktoken").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    tokenizer = load_tiktoken_file(tmp_path / "t.tiktoken")
    prompt = tokenizer.encode("ab")
    tokens = [256, em_dash[2], 257, 0xC3]  # the dash's first 2 bytes, its last; "ab"; half of an é
    _stream(tokenizer, prompt, iter(tokens))
    out = capsysbinary.readouterr().out.decode()
    assert out == tokenizer.decode(prompt + tokens) + f"\n{SEPARATOR}\n" == f"ab—ab\ufffd\n{SEPARATOR}\n"


def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tpshard", "generate", tmp_path / "missing.pt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("tpshard: error: ") and "missing.pt" in run.stderr


def test_ctrl_c_is_one_line_and_exit_130(shards: Path) -> None:
    """SIGINT while tokens stream: the text so far, then one line on stderr, exit code 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpshard", "generate", shards, "--max-new-tokens", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.read1(1)  # generating
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert err.decode().splitlines()[-1] == "tpshard: interrupted" and b"Traceback" not in err


def test_bad_requests_are_clear_errors(ckpt: Path, shards: Path, tmp_path: Path) -> None:
    assert "split it first" in cli_error(ckpt, "--mode", "simulated")
    assert "2-way shard set" in cli_error(shards, "--nproc", "3")
    assert "--nproc applies" in cli_error(ckpt, "--nproc", "2")
    assert "no such prompt file" in cli_error(ckpt, "--prompt-file", tmp_path / "nope.txt")
    assert "both given" in cli_error(ckpt, "--prompt", "A", "--prompt-file", tmp_path / "nope.txt")
    assert "--greedy" in cli_error(ckpt, "--temperature", "0")
    assert "not in the vocabulary" in cli_error(ckpt, "--prompt", "§")
    assert "expected cpu, cuda or cuda:N" in cli_error(ckpt, "--device", "tpu")
    if not torch.cuda.is_available():
        assert "no CUDA device" in cli_error(ckpt, "--device", "cuda")


def test_help_teaches_and_the_cli_does_not_import_torch() -> None:
    help_text = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200).stdout
    assert "Examples" in help_text and "--mode distributed" in help_text and "torchrun" in help_text
    code = "import sys, tpshard.cli.main; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize(
    ("sample", "prompt"), [("shakespeare_char", "ROMEO:"), ("shakespeare_bpe", "First Citizen:")], ids=["char", "bpe"]
)
def test_shipped_samples(sample: str, prompt: str) -> None:
    path = SAMPLES / sample / "ckpt.pt"
    if not path.is_file():
        pytest.skip(f"{path} not shipped in this checkout")
    text = generate(path, "--prompt", prompt, "--max-new-tokens", 60, "--seed", 1)
    assert text.startswith(prompt) and text.endswith(f"\n{SEPARATOR}\n") and "\ufffd" not in text
