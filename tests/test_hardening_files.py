"""Hardening II: the files tpshard writes and reads, trusted for nothing more.

- A shipped tokenizer takes a name of tpshard's choosing (meta.pkl for a char vocabulary, tokenizer.tiktoken
  for a BPE ranks file), so that no user's name can overwrite a rank file or the manifest, or be lost; a
  set's tokenizer is found through its manifest; a manifest whose tokenizer is named like a file of the
  set is refused.
- Odd values where tpshard expects others: a training config's dataset that is not a name, mixed dtypes,
  an HF vocab.json that is not an object, lone surrogates in a manifest, links that loop: one line, never
  a traceback.
- NaN and infinite weights fail verify, named, instead of passing with "max abs diff nan".
- Outputs that alias inputs through symbolic links, and links as outputs, are refused before anything
  is written.

The contract for a refusal (`refused`): exit 2, one line `tpshard: error: ...` on stderr, nothing on
stdout, no traceback, the tree under the work directory as before.
"""

import base64
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG, CHARS, write_nanogpt_checkpoint
from test_hardening import snapshot

from tpshard.config import GPTConfig
from tpshard.files.manifest_file import MANIFEST
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.runtime.programs import Trace
from tpshard.verify.numerics import compare

R0, R1 = "rank0-of-2.safetensors", "rank1-of-2.safetensors"
QUICK_VERIFY = ("--tokens", 1, "--random-tokens", 4, "--batch", 2)
GENERATE = ("--max-new-tokens", 2, "--greedy", "--prompt", "ab")
# vocab 260: room for a byte-level BPE of the 256 bytes and a few merges
BPE_CONFIG = GPTConfig(block_size=16, vocab_size=260, n_layer=1, n_head=2, n_embd=16, bias=True)

# --- the contract ------------------------------------------------------------------------------------


def refused(cli, root: Path, *args: object, culprit: str | None = None) -> str:
    """Exit 2 with one line naming culprit, nothing on stdout, nothing under root changed. Returns stderr."""
    before = snapshot(root)
    code, out, err = cli(*args)
    assert "Traceback" not in err
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert out == "", out
    assert err.startswith("tpshard: error: ") and err.count("\n") == 1, err
    if culprit is not None:
        assert culprit in err, err
    assert snapshot(root) == before
    return err


def verify_json(cli, *args: object) -> tuple[int, dict]:
    code, out, err = cli("verify", *args, "--json")
    assert "Traceback" not in err, err
    return code, json.loads(out, parse_constant=_no_constant)  # strict JSON: no NaN, no Infinity


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in the JSON report: not JSON")


def generated_with(cli, source: Path, *extra: object) -> str:
    """generate on source succeeds; the stderr line that says which tokenizer it used."""
    code, out, err = cli("generate", source, *GENERATE, *extra)
    assert code == 0, err
    assert out.startswith("ab"), out
    return next(line for line in err.splitlines() if "tokenizer" in line)


# --- the world: a checkpoint with its meta.pkl, and its 2-way shard set ------------------------------------


def edit_manifest(shards: Path, change) -> None:
    path = shards / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))  # ensure_ascii: a lone surrogate is written as "\ud800", as JSON allows


def meta_pkl_bytes() -> bytes:
    chars = CHARS[: BIAS_CONFIG.vocab_size]
    stoi = {c: i for i, c in enumerate(chars)}
    return pickle.dumps({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi})


def ranks_file_bytes() -> bytes:
    """A byte-level BPE: the 256 bytes, then the merges 'ab' and 'ba'."""
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"ba"]
    return b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens))


def nanogpt_dict(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=True)


# --- 1. the shipped tokenizer's name is tpshard's --------------------------------------------------------------

# a user's name for the tokenizer file that once overwrote a file of the set, or was never found again
# (without a .pkl or .tiktoken suffix, the content tells the kind)
COLLIDING = [R0, R1, MANIFEST, "vocab", "tokens.tiktoken.bak"]
USER_NAMES = [("char", n) for n in [*COLLIDING, "chars.pkl"]] + [("bpe", n) for n in [*COLLIDING, "bpe.tiktoken"]]


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with room for ranks_file_bytes()'s BPE, no tokenizer beside it. Read-only."""
    return write_nanogpt_checkpoint(tmp_path_factory.mktemp("bpe"), BPE_CONFIG, tokenizer=False)


@pytest.mark.parametrize(("kind", "name"), USER_NAMES)
def test_a_shipped_tokenizer_is_named_by_tpshard(
    kind: str, name: str, bias_ckpt: Path, bpe_ckpt: Path, tmp_path: Path, cli
) -> None:
    if kind == "char":  # (bias_ckpt has a meta.pkl beside it: --tokenizer comes first)
        ckpt, content, shipped = bias_ckpt, meta_pkl_bytes(), "meta.pkl"
    else:
        ckpt, content, shipped = bpe_ckpt, ranks_file_bytes(), "tokenizer.tiktoken"
    (tmp_path / "tok").mkdir()
    tokenizer = tmp_path / "tok" / name
    tokenizer.write_bytes(content)
    out = tmp_path / "out"
    code, stdout, err = cli("split", ckpt, "--tp", 2, "-o", out, "--tokenizer", tokenizer)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, R0, R1, shipped])
    assert (out / shipped).read_bytes() == content
    assert ShardSet.open(out).manifest.tokenizer == shipped
    code, stdout, err = cli("verify", out, *QUICK_VERIFY)
    assert code == 0, stdout
    assert str(out / shipped) in generated_with(cli, out)


def write_hf_vocab(folder: Path) -> None:
    """GPT-2's format: bytes as printable characters (tiktoken's data_gym table), and one merge, 'a b'."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order = printable + [b for b in range(256) if b not in printable]
    to_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(order[len(printable) :])}
    vocab = {to_char[b]: rank for rank, b in enumerate(order)} | {"ab": 256, "<|endoftext|>": 257}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")


def test_an_hf_vocab_ships_as_tokenizer_tiktoken(bpe_ckpt: Path, tmp_path: Path, cli) -> None:
    """The BPE of an HF directory's vocab.json + merges.txt has no file of its own: saved as a ranks file."""
    assert cli("split", bpe_ckpt, "--tp", 2, "-o", tmp_path / "s")[0] == 0
    hf = tmp_path / "hf"
    assert cli("merge", tmp_path / "s", "-o", hf, "--format", "hf")[0] == 0
    write_hf_vocab(hf)
    out = tmp_path / "out"
    code, _, err = cli("split", hf, "--tp", 2, "-o", out)
    assert code == 0, err
    assert ShardSet.open(out).manifest.tokenizer == "tokenizer.tiktoken"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, R0, R1, "tokenizer.tiktoken"])
    assert cli("verify", out, *QUICK_VERIFY)[0] == 0
    assert str(out / "tokenizer.tiktoken") in generated_with(cli, out)


@pytest.mark.parametrize("legacy", ["chars.pkl", "vocab", "rank0-of-4.safetensors", "rank3-of-4.safetensors"])
def test_a_set_finds_and_reshards_its_tokenizer_under_any_earlier_name(legacy: str, w: Path, cli) -> None:
    """A set written before the names were fixed kept the user's name: generate and verify --prompt find it
    through the manifest, and reshard renames it (once, a name like a rank file of the new set overwrote it)."""
    shards = w / "shards"
    (shards / "meta.pkl").rename(shards / legacy)
    edit_manifest(shards, lambda m: m.update(tokenizer=legacy))
    assert str(shards / legacy) in generated_with(cli, shards)
    code, report = verify_json(cli, shards, "--prompt", "ab", "--tokens", 1)
    assert code == 0, report["summary"]
    assert report["integrity"]["tokenizer"] == legacy and report["integrity"]["tokenizer_status"] == "ok"
    code, _, err = cli("reshard", shards, "--tp", 4, "-o", w / "tp4")
    assert code == 0, err
    out = w / "tp4"
    ranks = [f"rank{r}-of-4.safetensors" for r in range(4)]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "meta.pkl", *ranks])
    assert (out / "meta.pkl").read_bytes() == (w / "model" / "meta.pkl").read_bytes()
    assert cli("verify", out, *QUICK_VERIFY)[0] == 0
    assert str(out / "meta.pkl") in generated_with(cli, out)


@pytest.mark.parametrize("name", [R0, R1, MANIFEST])
@pytest.mark.parametrize("command", ["merge", "reshard", "generate", "inspect"])
def test_a_manifest_tokenizer_named_like_a_file_of_the_set_is_refused(command: str, name: str, w: Path, cli) -> None:
    edit_manifest(w / "shards", lambda m: m.update(tokenizer=name))
    argv = {
        "merge": ["merge", w / "shards", "-o", w / "m.pt"],
        "reshard": ["reshard", w / "shards", "--tp", 4, "-o", w / "out"],
        "generate": ["generate", w / "shards", *GENERATE],
        "inspect": ["inspect", w / "shards"],
    }[command]
    err = refused(cli, w, *argv, culprit=MANIFEST)
    assert "tokenizer" in err and name in err


def test_a_rank_file_named_manifest_json_is_refused(w: Path, cli) -> None:
    edit_manifest(w / "shards", lambda m: m["files"][0].update(file=MANIFEST))
    err = refused(cli, w, "merge", w / "shards", "-o", w / "m.pt", culprit="invalid manifest")
    assert "files[0] name 'manifest.json'" in err


def test_verify_fails_a_set_whose_tokenizer_is_missing(w: Path, cli) -> None:
    (w / "shards" / "meta.pkl").unlink()
    code, report = verify_json(cli, w / "shards", *QUICK_VERIFY)
    assert code == 1
    assert report["integrity"]["tokenizer_status"] == "the shard set's tokenizer (named in the manifest) is missing"
    assert "meta.pkl" in report["summary"]


# --- 2. odd values: one line, never a traceback ---------------------------------------------------------------------


@pytest.mark.parametrize("dataset", [3, ["shakespeare_char"], {"name": "x"}, 2.5, True, ""])
def test_a_dataset_that_is_not_a_name_is_no_dataset(dataset: object, w: Path, cli) -> None:
    """nanoGPT's dataset names data/<dataset>/meta.pkl: anything but a string is ignored, never joined to a path."""
    ckpt = w / "model" / "ckpt.pt"
    torch.save({**nanogpt_dict(ckpt), "config": {"dataset": dataset}}, ckpt)
    code, _, err = cli("inspect", ckpt)
    assert code == 0, err
    code, _, err = cli("split", ckpt, "--tp", 2, "-o", w / "out")
    assert code == 0, err
    generated_with(cli, ckpt)
    # and with no tokenizer to be found anywhere, the shard set's recorded dataset is looked at: one line
    (w / "model" / "meta.pkl").unlink()
    assert cli("split", ckpt, "--tp", 2, "-o", w / "bare")[0] == 0
    refused(cli, w, "generate", w / "bare", *GENERATE, culprit="no tokenizer found")


@pytest.mark.parametrize("command", ["inspect", "split", "generate", "verify"])
def test_mixed_dtypes_are_refused_naming_two_tensors(command: str, w: Path, cli) -> None:
    ckpt = w / "model" / "ckpt.pt"
    raw = nanogpt_dict(ckpt)
    raw["model"]["transformer.h.1.mlp.c_fc.weight"] = raw["model"]["transformer.h.1.mlp.c_fc.weight"].half()
    torch.save(raw, ckpt)
    argv = {
        "inspect": ["inspect", ckpt],
        "split": ["split", ckpt, "--tp", 2, "-o", w / "out"],
        "generate": ["generate", ckpt, *GENERATE],
        "verify": ["verify", w / "shards", "--against", ckpt, *QUICK_VERIFY],
    }[command]
    err = refused(cli, w, *argv, culprit="mixed dtypes")
    assert "transformer.wte.weight is float32" in err and "transformer.h.1.mlp.c_fc.weight is float16" in err


VOCABS = {"a list": "[1, 2]", "a string": '"gpt2"', "a number": "7", "null": "null", "deep": "[" * 9000 + "]" * 9000}


@pytest.mark.parametrize("vocab", VOCABS.values(), ids=VOCABS.keys())
def test_an_hf_vocab_json_that_is_not_an_object(vocab: str, w: Path, cli) -> None:
    hf = w / "hf"
    assert cli("merge", w / "shards", "-o", hf, "--format", "hf")[0] == 0
    (hf / "vocab.json").write_text(vocab)
    (hf / "merges.txt").write_text("#version: 0.2\n")
    refused(cli, w, "generate", hf, *GENERATE, culprit="vocab.json")
    code, out, err = cli("inspect", hf, "--json")  # the tokenizer is a fact of the report: not found, and why
    assert code == 0, err
    facts = json.loads(out)
    assert facts["tokenizer"] is None and "vocab.json" in facts["tokenizer_note"]
    code, _, err = cli("split", hf, "--tp", 2, "-o", w / "out")
    assert code == 0 and "vocab.json" in err and "ships without a tokenizer" in err, err


SURROGATES = {
    "a rank file's name": lambda m: m["files"][0].update(file="rank0\ud800.safetensors"),
    "the source's name": lambda m: m["source"].update(file="ckpt\udcff.pt"),
    "the tokenizer's name": lambda m: m.update(tokenizer="meta\ud800.pkl"),
    "the dataset": lambda m: m["source"]["config"].update(dataset="chars\ud800"),
    "a key": lambda m: m["source"]["config"].update({"\udfff": 1}),
}


@pytest.mark.parametrize("case", SURROGATES)
@pytest.mark.parametrize("command", ["inspect", "merge", "reshard", "generate", "verify"])
def test_a_lone_surrogate_in_a_manifest_is_refused(command: str, case: str, w: Path, cli) -> None:
    """JSON allows "\\ud800"; no file name, terminal or UTF-8 file can hold what it decodes to."""
    edit_manifest(w / "shards", SURROGATES[case])
    if command == "verify":  # checking sets is its job: a report, exit 1
        code, report = verify_json(cli, w / "shards", *QUICK_VERIFY)
        assert code == 1 and "lone surrogate" in report["summary"]
        return
    argv = {
        "inspect": ["inspect", w / "shards"],
        "merge": ["merge", w / "shards", "-o", w / "m.pt"],
        "reshard": ["reshard", w / "shards", "--tp", 4, "-o", w / "out"],
        "generate": ["generate", w / "shards", *GENERATE],
    }[command]
    err = refused(cli, w, *argv, culprit=MANIFEST)
    assert "lone surrogate" in err


def test_a_lone_surrogate_in_a_checkpoints_config_is_refused(w: Path, cli) -> None:
    """Its manifest could not hold it: refused at the source, not by every later reader of the set."""
    ckpt = w / "model" / "ckpt.pt"
    torch.save({**nanogpt_dict(ckpt), "config": {"out_dir": "out\udcff"}}, ckpt)
    refused(cli, w, "split", ckpt, "--tp", 2, "-o", w / "out", culprit="lone surrogate")


SOURCE_FIELDS = {
    "sha256 a number": ("sha256", 5),
    "file a list": ("file", ["ckpt.pt"]),
    "resharded_from_tp a string": ("resharded_from_tp", "2"),
    "optimizer_left_out a string": ("optimizer_left_out", "no"),
}


@pytest.mark.parametrize("case", SOURCE_FIELDS)
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_a_source_field_of_the_wrong_type_is_refused(command: str, case: str, w: Path, cli) -> None:
    key, value = SOURCE_FIELDS[case]
    edit_manifest(w / "shards", lambda m: m["source"].update({key: value}))
    argv = ["inspect", w / "shards"] if command == "inspect" else ["merge", w / "shards", "-o", w / "m.pt"]
    err = refused(cli, w, *argv, culprit=MANIFEST)
    assert f"source {key}" in err


def loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)  # a link to itself


@pytest.mark.parametrize("which", [R1, MANIFEST, "meta.pkl"])
@pytest.mark.parametrize("command", ["merge", "reshard", "generate", "verify"])
def test_a_symlink_loop_in_a_shard_set_is_named(command: str, which: str, w: Path, cli) -> None:
    loop(w / "shards" / which)
    if command == "verify":
        code, report = verify_json(cli, w / "shards", *QUICK_VERIFY)
        assert code == 1 and "symbolic link loop" in report["summary"] and which in report["summary"]
        return
    argv = {
        "merge": ["merge", w / "shards", "-o", w / "m.pt"],
        "reshard": ["reshard", w / "shards", "--tp", 4, "-o", w / "out"],
        "generate": ["generate", w / "shards", *GENERATE],
    }[command]
    if (command, which) == ("merge", "meta.pkl"):  # a checkpoint holds no tokenizer: merge has no use for it
        assert cli(*argv)[0] == 0
        return
    err = refused(cli, w, *argv, culprit="symbolic link loop")
    assert which in err


# --- 3. non-finite weights fail verify ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("against", [True, False])
def test_non_finite_weights_fail_verify(value: float, against: bool, w: Path, cli) -> None:
    ckpt = w / "model" / "ckpt.pt"
    raw = nanogpt_dict(ckpt)
    raw["model"]["transformer.h.1.mlp.c_fc.weight"][3, 5] = value
    torch.save(raw, ckpt)
    assert cli("split", ckpt, "--tp", 2, "-o", w / "bad")[0] == 0
    extra = ("--against", ckpt) if against else ()
    code, report = verify_json(cli, w / "bad", *extra, *QUICK_VERIFY)
    assert code == 1 and not report["passed"]
    numerics = report["numerics"]
    assert not numerics["passed"]
    assert numerics["problems"][0].startswith("dense logits not finite")
    assert numerics["problems"][1].startswith("sharded logits not finite")
    assert any(p.startswith("residual stream not finite from block 1") for p in numerics["problems"])
    for side in ("dense_nonfinite", "sharded_nonfinite"):
        assert numerics[side]["values"] > 0 and numerics[side]["first_sequence"] == 0
    assert numerics["logits_outside"] >= numerics["sharded_nonfinite"]["values"] > 0
    assert "dense logits not finite" in report["summary"]
    code, out, err = cli("verify", w / "bad", *extra, *QUICK_VERIFY)  # the rendered report, too
    assert code == 1 and "Traceback" not in err
    assert "not finite" in out and "FAIL" in out


def trace(logits: torch.Tensor) -> Trace:
    batch, length, _ = logits.shape
    hidden = [torch.zeros(batch, length, 4)]
    return Trace(hidden, logits, torch.zeros(batch, 0, dtype=torch.long), torch.zeros(batch, 0, 2), [])


def test_non_finite_logits_on_one_side_are_named_with_their_position() -> None:
    """The sharded side alone, at sequence 3 (the second batch's second row), token 2."""
    gen = torch.Generator().manual_seed(0)
    dense = [trace(torch.randn(2, 4, 8, generator=gen)) for _ in range(2)]
    sharded = [trace(t.logits.clone()) for t in dense]
    sharded[1].logits[1, 2, 5] = float("nan")
    sharded[1].logits[1, 3, 0] = float("inf")
    result = compare(dense, sharded, (1e-4, 1e-5, "given"), torch.float32)
    assert not result.passed and result.dense_nonfinite is None
    bad = result.sharded_nonfinite
    assert bad is not None
    assert (bad.values, bad.nan, bad.positions, bad.first_sequence, bad.first_token) == (2, 1, 2, 3, 2)
    assert result.problems[0] == (
        "sharded logits not finite: 2 of 128 (1 NaN, 1 infinite) at 2 of 16 positions, first at sequence 3 token 2"
    )
    assert result.logits_outside == 2 and result.finite_positions == 14
    assert result.logits_max_abs == 0.0 and result.kl_max == 0.0  # over the 14 finite positions: identical


# --- 4. outputs that alias inputs through links, and links as outputs ----------------------------------------------


def link(at: Path, to: Path) -> Path:
    at.symlink_to(to)
    return at


# (the command, the input the link leads to): a link named l beside the inputs, given as -o with --force
ALIASES = {
    "merge -o a link to a rank file": (["merge", "shards"], f"shards/{R0}"),
    "merge -o a link to the manifest": (["merge", "shards"], f"shards/{MANIFEST}"),
    "merge -o a link to the tokenizer": (["merge", "shards"], "shards/meta.pkl"),
    "merge hf -o a link to the set": (["merge", "shards", "--format", "hf"], "shards"),
    "reshard -o a link to the set": (["reshard", "shards", "--tp", 4], "shards"),
    "reshard -o a link to its parent": (["reshard", "shards", "--tp", 4], "."),
    "split -o a link to the model's folder": (["split", "model/ckpt.pt", "--tp", 2], "model"),
    "split -o a link to the tokenizer": (["split", "model/ckpt.pt", "--tp", 2], "model/meta.pkl"),
}


@pytest.mark.parametrize("case", ALIASES)
def test_force_through_a_link_never_replaces_an_input(case: str, w: Path, cli) -> None:
    (command, source, *rest), target = ALIASES[case]
    out = link(w / "l", w / target)
    err = refused(cli, w, command, w / source, *rest, "-o", out, "--force")
    assert "input" in err


def test_reshard_never_replaces_what_a_rank_files_link_leads_to(w: Path, cli) -> None:
    """A rank file may be a link to another folder: --force over that folder would delete the input's data."""
    (w / "store").mkdir()
    (w / "shards" / R0).rename(w / "store" / R0)
    link(w / "shards" / R0, w / "store" / R0)
    assert cli("verify", w / "shards", *QUICK_VERIFY)[0] == 0  # a valid set
    refused(cli, w, "reshard", w / "shards", "--tp", 4, "-o", w / "store", "--force", culprit=R0)


def test_split_never_replaces_what_an_hf_directorys_links_lead_to(w: Path, cli) -> None:
    """The hub's cache: each file of a snapshot is a link to a blob."""
    hf = w / "hf"
    assert cli("merge", w / "shards", "-o", hf, "--format", "hf")[0] == 0
    (w / "blobs").mkdir()
    (hf / "model.safetensors").rename(w / "blobs" / "model.safetensors")
    link(hf / "model.safetensors", w / "blobs" / "model.safetensors")
    refused(cli, w, "split", hf, "--tp", 2, "-o", w / "blobs", "--force", culprit="model.safetensors")


WRITERS = {
    "split": lambda w, out: ["split", w / "model" / "ckpt.pt", "--tp", 2, "-o", out],
    "reshard": lambda w, out: ["reshard", w / "shards", "--tp", 4, "-o", out],
    "merge pt": lambda w, out: ["merge", w / "shards", "-o", out],
    "merge hf": lambda w, out: ["merge", w / "shards", "-o", out, "--format", "hf"],
}


@pytest.mark.parametrize("kind", ["a link to nothing", "a link loop"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_dangling_or_looping_link_is_an_existing_output(writer: str, kind: str, w: Path, cli) -> None:
    out = link(w / "out", w / "nowhere") if kind == "a link to nothing" else link(w / "out", Path("out"))
    err = refused(cli, w, *WRITERS[writer](w, out), culprit="out")
    assert "already exists" in err
    if writer != "merge pt":  # a directory writer is not let loose on a link to no directory
        err = refused(cli, w, *WRITERS[writer](w, out), "--force", culprit="out")
        assert "not a directory" in err and "symbolic link" in err


def test_merge_force_over_a_link_to_the_source_replaces_the_link_only(w: Path, cli) -> None:
    source = w / "model" / "ckpt.pt"
    before = source.read_bytes()
    out = link(w / "merged.pt", source)
    code, _, err = cli("merge", w / "shards", "-o", out, "--force")
    assert code == 0, err
    assert not out.is_symlink() and source.read_bytes() == before
    assert load_checkpoint(out).config == load_checkpoint(source).config
