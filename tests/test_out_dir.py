"""A nanoGPT out_dir (the folder train.py writes ckpt.pt into, which sample.py's --out_dir takes) is
accepted everywhere a checkpoint goes, with its meta.pkl found as sample.py finds it."""

import json
from pathlib import Path

from tpshard.files.paths import Kind, kind_of


def test_an_out_dir_is_a_checkpoint(bias_ckpt: Path, tmp_path: Path) -> None:
    assert kind_of(bias_ckpt.parent) is Kind.NANOGPT_OUT_DIR
    assert kind_of(tmp_path) is Kind.OTHER_DIRECTORY  # no ckpt.pt: not one


def test_generate_from_an_out_dir_is_generate_from_its_ckpt(bias_ckpt: Path, cli) -> None:
    args = ["--greedy", "--max-new-tokens", "12", "--prompt", "ab"]
    from_file, from_dir = cli("generate", bias_ckpt, *args), cli("generate", bias_ckpt.parent, *args)
    assert from_file[0] == from_dir[0] == 0, from_dir[2]
    assert from_dir[1] == from_file[1] and len(from_dir[1]) > len("ab")
    assert "meta.pkl" in from_dir[2]  # the char vocabulary beside ckpt.pt, as sample.py finds it


def test_inspect_and_split_take_an_out_dir(bias_ckpt: Path, tmp_path: Path, cli) -> None:
    code, out, err = cli("inspect", bias_ckpt.parent, "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["kind"] == "checkpoint" and facts["path"] == str(bias_ckpt)
    assert facts["optimizer"]["present"]  # sized from the ckpt.pt inside
    code, _, err = cli("split", bias_ckpt.parent, "--tp", "2", "-o", tmp_path / "s")
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["source"]["file"] == "ckpt.pt" and manifest["tokenizer"] == "meta.pkl"
    code, out, err = cli("verify", tmp_path / "s", "--against", bias_ckpt.parent, "--tokens", "2", "--json")
    assert code == 0, err
    merge = json.loads(out)["integrity"]["merge"]
    assert merge["identical"] == merge["tensors"] and merge["source_sha256_matches"] is True
    assert merge["source_file"] == "ckpt.pt"


def test_a_directory_without_ckpt_pt_is_still_refused(tmp_path: Path, cli) -> None:
    code, out, err = cli("generate", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "no manifest.json" in err
