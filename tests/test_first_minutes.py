"""What a new user meets first: usage errors are one line, `tpshard` alone lists the commands, a prompt
outside the vocabulary names every bad character, and the README's outputs stay out of `git status`."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tpshard.errors import TpshardError
from tpshard.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("split", "merge", "reshard", "inspect", "verify", "generate")

# per command: (arguments, what the error line must name); "{src}" is the checkpoint (or a path that
# the command never reaches: a usage error is found before any file is read)
USAGE_ERRORS = {
    "bad value": {
        "split": (["{src}", "--tp", "two", "-o", "{out}"], "--tp"),
        "merge": (["{src}", "-o", "{out}", "--format", "zip"], "--format"),
        "reshard": (["{src}", "--tp", "two", "-o", "{out}"], "--tp"),
        "inspect": (["{src}", "--tp", "two"], "--tp"),
        "verify": (["{src}", "--tokens", "two"], "--tokens"),
        "generate": (["{src}", "--max-new-tokens", "two"], "--max-new-tokens"),
    },
    "missing value": {
        "split": (["{src}", "-o", "{out}", "--tp"], "--tp"),
        "merge": (["{src}", "-o"], "-o"),
        "reshard": (["{src}", "-o", "{out}", "--tp"], "--tp"),
        "inspect": (["{src}", "--tp"], "--tp"),
        "verify": (["{src}", "--tokens"], "--tokens"),
        "generate": (["{src}", "--prompt"], "--prompt"),
    },
    "unknown option": {command: (["{src}", "--bogus"], "--bogus") for command in COMMANDS},
    "missing argument": {
        "split": (["--tp", "2", "-o", "{out}"], "checkpoint"),
        "merge": (["-o", "{out}"], "shards"),
        "reshard": (["--tp", "2", "-o", "{out}"], "shards"),
        "inspect": ([], "path"),
        "verify": ([], "shards"),
        "generate": ([], "ckpt_or_shards"),
    },
    "missing option": {
        "split": (["{src}", "--tp", "2"], "--out"),
        "merge": (["{src}"], "--out"),
        "reshard": (["{src}", "-o", "{out}"], "--tp"),
    },
}
CASES = [(kind, command) for kind, by_command in USAGE_ERRORS.items() for command in by_command]


@pytest.mark.parametrize(("kind", "command"), CASES, ids=[f"{c}-{k.replace(' ', '-')}" for k, c in CASES])
def test_a_usage_error_is_one_line_naming_the_option(cli, bias_ckpt: Path, tmp_path: Path, kind, command) -> None:
    args, named = USAGE_ERRORS[kind][command]
    code, out, err = cli(command, *(a.format(src=bias_ckpt, out=tmp_path / "out") for a in args))
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("tpshard: error: ")
    assert named in err.lower()  # click says 'checkpoint' where the help says CHECKPOINT
    assert err.rstrip().endswith(f"; see 'tpshard {command} --help'")
    assert "Usage:" not in err and "╭" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_bad_value_says_what_was_expected(cli, bias_ckpt: Path) -> None:
    _, _, err = cli("verify", bias_ckpt, "--mode", "dense")
    assert "'--mode'" in err and "'simulated'" in err and "'distributed'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [["nosuch"], ["--bogus"], ["--bogus", "split"]])
def test_a_root_usage_error_is_one_line_too(cli, args: list[str]) -> None:
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.startswith("tpshard: error: ") and len(err.splitlines()) == 1
    assert err.rstrip().endswith("; see 'tpshard --help'")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_still_works(cli, command: str) -> None:
    code, out, err = cli(command, "--help")
    assert code == 0 and err == ""
    assert f"tpshard {command}" in out and "--help" in out


def test_root_help_and_version_exit_0(cli) -> None:
    code, out, _ = cli("--help")
    assert code == 0 and all(command in out for command in COMMANDS)
    code, out, _ = cli("-h")
    assert code == 0 and "Usage" in out
    code, out, _ = cli("--version")
    assert code == 0 and re.fullmatch(r"tpshard \S+\n", out)


def test_no_arguments_is_a_short_list_of_the_commands_on_stderr(cli) -> None:
    """`tpshard` alone: a usage line and one line per command, on stderr (it is a usage error), exit 2."""
    code, out, err = cli()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert 1 + len(COMMANDS) <= len(lines) <= 12
    assert lines[0].startswith("usage: tpshard COMMAND")
    for command in COMMANDS:
        assert any(line.split()[:1] == [command] for line in lines), command
    assert max(map(len, lines)) <= 100  # no wrapping box: one summary a line
    assert "--help" in lines[-1]


def test_a_failed_check_still_exits_1(cli, bias_ckpt: Path, tmp_path: Path) -> None:
    """typer.Exit(1) from verify comes back as the exit code, not as 0 (standalone_mode=False)."""
    code, _, err = cli("split", bias_ckpt, "--tp", "2", "-o", tmp_path / "tp2")
    assert code == 0, err
    rank = tmp_path / "tp2" / "rank1-of-2.safetensors"
    data = bytearray(rank.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor's data
    rank.write_bytes(bytes(data))
    code, _, _ = cli("verify", tmp_path / "tp2", "--json")
    assert code == 1


# --- a prompt outside a char vocabulary ------------------------------------------------------------


def test_every_character_outside_the_vocabulary_is_named(cli, bias_ckpt: Path) -> None:
    prompt = "Caf\u00e9 \u20ac5, Stra\u00dfe \u00e9"  # é, €, ß: not in conftest's CHARS; é twice
    code, out, err = cli("generate", bias_ckpt, "--prompt", prompt, "--max-new-tokens", "1")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("tpshard: error: ")
    assert "3 characters 'é' (index 3), '€' (index 5), 'ß' (index 13) are not in the vocabulary" in err


def test_the_bad_characters_named_are_capped_at_5_and_counted() -> None:
    chars = "abc"
    tokenizer = CharTokenizer({c: i for i, c in enumerate(chars)}, dict(enumerate(chars)), 3, Path("meta.pkl"))
    with pytest.raises(TpshardError) as e:
        tokenizer.encode("aABaCDEFGHAa")
    named = "'A' (index 1), 'B' (index 2), 'C' (index 4), 'D' (index 5), 'E' (index 6)"
    assert str(e.value).startswith(f"8 characters {named} and 3 more are not in the vocabulary")
    assert "'F'" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TpshardError, match=r"^character '\\n' \(index 1\) is not in the vocabulary"):
        tokenizer.encode("a\nb")
    assert tokenizer.encode("cab") == [2, 0, 1]


# --- the README's outputs --------------------------------------------------------------------------


def readme_outputs() -> list[str]:
    """Every file or folder a `$ tpshard ...` line of the README writes (-o/--out/--html NAME), a
    folder with a trailing slash (what split and reshard write, and merge --format hf)."""
    text = (ROOT / "README.md").read_text()
    names = []
    for line in text.splitlines():
        if line.startswith("$ tpshard "):
            folder = line.split()[2] in ("split", "reshard") or "--format hf" in line
            for option, name in re.findall(r"(-o|--out|--html)\s+(\S+)", line):
                names.append(name + "/" if folder and option != "--html" else name)
    return names


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_what_the_readme_tour_writes_is_ignored_by_git() -> None:
    names = readme_outputs()
    assert {"shards/", "shards4/", "merged.pt", "bf16/"} <= set(names)
    for name in names:
        result = subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", name], capture_output=True)
        assert result.returncode == 0, f"{name}: written by the README's tour, not in .gitignore"


def test_the_quick_start_can_be_run_twice() -> None:
    """The quick start's run line writes into a new folder each time: no 'already exists' the second
    time, and no --force to learn first."""
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    assert lines[0].startswith("python3 -m venv ")  # PEP 668: never pip into the system Python
    run = next(line for line in lines if "tpshard split" in line)
    assert "--force" not in run and run.startswith("out=$(mktemp -d) && ")
    assert "-o $out/" in run and "tpshard verify $out/" in run and "tpshard generate $out/" in run
