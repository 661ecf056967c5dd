"""`tpshard verify`: a good shard set passes; damage (a flipped byte, swapped, truncated or missing files,
a broken manifest) fails integrity with the file and the tensor named; numerics fail below the measured
error or on a wrong reduction; JSON, HTML and exit codes as documented."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tpshard.comm.counting import CountingCollectives
from tpshard.convert import split_checkpoint
from tpshard.files.paths import load_checkpoint
from tpshard.files.tensorfile import DTYPES

N_LAYER = 2  # conftest's BIAS_CONFIG: 2 layers, 4 heads, n_embd 32, vocab 96, block 32
TENSORS = 4 + 12 * N_LAYER  # wte, wpe, ln_f weight and bias; per block 6 layers with weight and bias
SPLIT_TENSOR = "transformer.h.1.mlp.c_fc.weight"
REPLICATED_TENSOR = "transformer.h.0.ln_2.weight"


@pytest.fixture(scope="module")
def sets(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shard sets of conftest's bias checkpoint, split once for the module. Read-only: copy to damage."""
    folder = tmp_path_factory.mktemp("verify")
    dense = load_checkpoint(bias_ckpt)
    meta = bias_ckpt.parent / "meta.pkl"
    split_checkpoint(dense, 2, folder / "tp2", tokenizer_file=meta)
    split_checkpoint(dense, 2, folder / "tp2-bf16", dtype=DTYPES["bfloat16"])
    split_checkpoint(dense, 4, folder / "tp4-vocab", vocab_parallel=True)
    return {"ckpt": bias_ckpt, **{p.name: p for p in folder.iterdir()}}


@pytest.fixture
def damaged(sets: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the 2-way set, to damage."""
    return Path(shutil.copytree(sets["tp2"], tmp_path / "tp2"))


def verify_json(cli, *args: object) -> tuple[int, dict]:
    code, out, _ = cli("verify", *args, "--json")
    return code, json.loads(out)  # the whole of stdout is the document


def data_offset(path: Path, tensor: str) -> int:
    """The file offset of a tensor's first byte (safetensors: 8-byte header length, JSON header, data)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return 8 + length + header[tensor]["data_offsets"][0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


# --- passing -----------------------------------------------------------------------------------------


def test_a_good_shard_set_passes(cli, sets: dict[str, Path]) -> None:
    code, out, _ = cli("verify", sets["tp2"], "--against", sets["ckpt"])
    assert code == 0, out
    assert "1. integrity  PASS" in out and "2. numerics  PASS" in out and "3. communication  PASS" in out
    assert f"{TENSORS} of {TENSORS} tensors bit-identical" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS")


def test_json_holds_every_fact_and_nothing_else_is_on_stdout(cli, sets: dict[str, Path]) -> None:
    code, report = verify_json(cli, sets["tp2"], "--against", sets["ckpt"], "--batch", "2", "--tokens", "5")
    assert code == 0
    assert report["schema_version"] == 1 and report["passed"] is True
    assert list(report)[:2] == ["schema_version", "passed"]
    assert report["compared"]["inputs"] == {
        "kind": "random",
        "sequences": 2,
        "tokens": [32, 32],  # min(64, block_size)
        "new_tokens": 5,
        "context": [27, 27],  # room for the 5 new tokens in block_size 32: every step uses the KV cache
        "seed": 0,
        "prompts": [],
    }
    integrity, numerics, comm = report["integrity"], report["numerics"], report["communication"]
    assert [f["status"] for f in integrity["files"]] == ["ok", "ok"]
    assert integrity["merge"]["identical"] == integrity["merge"]["tensors"] == TENSORS
    assert [layer["name"] for layer in numerics["layers"]] == ["embedding", "block 0", "block 1"]
    assert numerics["layers"][0]["max_abs"] == 0  # the embedding is replicated: no reduction yet
    assert (numerics["atol"], numerics["rtol"], numerics["tolerance_source"]) == (1e-4, 1e-5, "default for float32")
    assert numerics["top1_agreement"] == 1.0 and numerics["logits_outside"] == 0
    assert numerics["greedy"]["matched"] == 2 and numerics["greedy"]["first_divergence"] == [None, None]
    # 2 per block; one full forward + 5 greedy forwards (prefill, then 4 steps through the cache)
    assert comm["sync_points_theory"] == 2 * N_LAYER and comm["sync_points_measured"] == [2 * N_LAYER]
    assert comm["forwards"] == 6
    assert comm["bytes_per_token_measured"] == comm["bytes_per_token_theory"] == 2 * N_LAYER * 32 * 4


def test_prompts_are_tokenized_with_the_shipped_tokenizer(cli, sets: dict[str, Path]) -> None:
    code, report = verify_json(cli, sets["tp2"], "--prompt", "To be", "--prompt", "or not to be", "--tokens", "4")
    assert code == 0
    inputs = report["compared"]["inputs"]
    assert (inputs["kind"], inputs["tokens"], inputs["seed"]) == ("prompt", [5, 12], None)
    assert report["numerics"]["positions"] == 17


def test_a_bfloat16_set_is_compared_with_its_dense_model_in_bfloat16(cli, sets: dict[str, Path]) -> None:
    code, report = verify_json(cli, sets["tp2-bf16"], "--against", sets["ckpt"])
    assert code == 0, report["summary"]
    assert report["integrity"]["merge"]["cast"] == "the reference's float32 cast to bfloat16"
    numerics = report["numerics"]
    assert numerics["tolerance_source"] == "default for bfloat16"
    assert 0 < numerics["logits_max_abs"] < numerics["atol"]
    assert numerics["greedy"]["exact_required"] is False


def test_a_vocab_parallel_set_counts_the_embedding_reduction(cli, sets: dict[str, Path]) -> None:
    code, report = verify_json(cli, sets["tp4-vocab"], "--tokens", "3")
    assert code == 0
    assert report["communication"]["sync_points_measured"] == [2 * N_LAYER + 1]


# --- integrity failures ------------------------------------------------------------------------------


def test_a_flipped_byte_names_the_file_and_the_tensor(cli, sets: dict[str, Path], damaged: Path) -> None:
    rank1 = damaged / "rank1-of-2.safetensors"
    offset = data_offset(rank1, SPLIT_TENSOR) + 101
    flip_byte(rank1, offset)
    code, out, _ = cli("verify", damaged, "--against", sets["ckpt"])
    assert code == 1
    assert f"rank1-of-2.safetensors: damaged tensor {SPLIT_TENSOR} (first bad byte at offset {offset:,})" in out
    assert "skipped: integrity failed" in out
    code, report = verify_json(cli, damaged, "--against", sets["ckpt"])
    assert code == 1 and report["passed"] is False
    good, bad = report["integrity"]["files"]
    assert good["status"] == "ok" and good["sha256_matches"] is True
    assert bad["status"] == "corrupt" and bad["sha256_matches"] is False
    assert (bad["damaged_tensors"], bad["first_bad_byte"]) == ([SPLIT_TENSOR], offset)
    assert report["integrity"]["merge"]["first_difference"].startswith(SPLIT_TENSOR)
    assert report["numerics"]["skipped"] and report["communication"]["skipped"]


def test_without_a_reference_a_replicated_tensor_is_named_by_its_replicas(cli, damaged: Path) -> None:
    rank0 = damaged / "rank0-of-2.safetensors"
    offset = data_offset(rank0, REPLICATED_TENSOR) + 6
    flip_byte(rank0, offset)
    code, report = verify_json(cli, damaged)
    assert code == 1
    bad = report["integrity"]["files"][0]
    assert (bad["damaged_tensors"], bad["first_bad_byte"]) == ([REPLICATED_TENSOR], offset)
    assert bad["located_by"] == "replicated tensors compared with rank 1's copies"


def test_without_a_reference_damage_in_a_split_tensor_is_reported_honestly(cli, damaged: Path) -> None:
    rank1 = damaged / "rank1-of-2.safetensors"
    flip_byte(rank1, data_offset(rank1, SPLIT_TENSOR))
    code, report = verify_json(cli, damaged)
    assert code == 1
    bad = report["integrity"]["files"][1]
    assert bad["status"] == "corrupt" and bad["damaged_tensors"] == []
    assert "pass --against CKPT to name the tensor" in bad["located_by"]


def test_swapped_rank_files_fail(cli, damaged: Path) -> None:
    rank0, rank1 = damaged / "rank0-of-2.safetensors", damaged / "rank1-of-2.safetensors"
    rank0.rename(damaged / "tmp")
    rank1.rename(rank0)
    (damaged / "tmp").rename(rank1)
    code, report = verify_json(cli, damaged)
    assert code == 1
    files = report["integrity"]["files"]
    assert [(f["status"], f["holds_rank"]) for f in files] == [("wrong rank", 1), ("wrong rank", 0)]
    assert "files swapped?" in files[0]["problem"]


def test_a_truncated_file_fails_and_every_other_file_is_still_listed(cli, damaged: Path) -> None:
    rank0 = damaged / "rank0-of-2.safetensors"
    rank0.write_bytes(rank0.read_bytes()[:-64])
    code, report = verify_json(cli, damaged)
    assert code == 1
    truncated, other = report["integrity"]["files"]
    assert truncated["status"] == "wrong size" and truncated["bytes"] == truncated["expected_bytes"] - 64
    assert other["status"] == "ok" and other["sha256_matches"] is True


def test_a_missing_file_fails(cli, damaged: Path) -> None:
    (damaged / "rank1-of-2.safetensors").unlink()
    code, out, _ = cli("verify", damaged)
    assert code == 1
    assert "missing: the file is missing" in out


def test_a_damaged_manifest_fails_integrity(cli, damaged: Path) -> None:
    manifest = damaged / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 99}))
    code, report = verify_json(cli, damaged)
    assert code == 1
    assert report["integrity"]["manifest_ok"] is False
    assert "version 99 is not supported" in report["integrity"]["problems"][0]
    assert report["numerics"]["skipped"] == "skipped: the manifest is unreadable"


# --- numerics failures -------------------------------------------------------------------------------


def test_a_tolerance_below_the_measured_error_fails(cli, sets: dict[str, Path]) -> None:
    code, report = verify_json(cli, sets["tp2"], "--atol", "0", "--rtol", "0", "--tokens", "2")
    assert code == 1
    numerics = report["numerics"]
    assert numerics["logits_max_abs"] > 0  # tensor parallelism reassociates the sums: the error is not zero
    assert numerics["passed"] is False and numerics["logits_outside"] > 0
    assert numerics["tolerance_source"] == "atol and rtol given"
    assert report["integrity"]["passed"] and report["communication"]["passed"]
    assert report["summary"].startswith("numerics: ")


def test_a_wrong_reduction_fails_numerics(cli, sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime bug (here: an all-reduce that leaves out the last rank's partial sum) fails numerics,
    while the reductions are still counted as the theory says."""
    reduce = CountingCollectives.reduce_partials
    monkeypatch.setattr(CountingCollectives, "reduce_partials", lambda self, partials: reduce(self, partials[:-1]))
    code, report = verify_json(cli, sets["tp2"], "--tokens", "4")
    assert code == 1
    numerics = report["numerics"]
    assert numerics["layers"][0]["max_abs"] == 0 and numerics["layers"][1]["max_abs"] > 1e-3
    assert numerics["logits_outside"] > 0 and numerics["logits_max_abs"] > 1e-3
    assert report["communication"]["passed"]


# --- output and exit codes ---------------------------------------------------------------------------


def test_html_report(cli, sets: dict[str, Path], damaged: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    code, out, _ = cli("verify", sets["tp2"], "--json", "--html", page, "--tokens", "2")
    assert code == 0
    json.loads(out)  # --html does not add to stdout
    assert "<html" in page.read_text() and "PASS" in page.read_text()
    (damaged / "rank1-of-2.safetensors").unlink()
    code, _, _ = cli("verify", damaged, "--html", page)
    assert code == 1 and "FAIL" in page.read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["{missing}"],
        ["{empty}"],  # a directory without manifest.json
        ["{tp2}", "--against", "{missing}"],
        ["{tp2}", "--prompt", "x", "--random-tokens", "4"],
        ["{tp2}", "--prompt", "x", "--batch", "2"],
        ["{tp2}", "--random-tokens", "33"],  # more than block_size
        ["{tp2}", "--prompt", "\u00e9"],  # not in the char vocabulary
        ["{tp2}", "--mode", "dense"],
    ],
)
def test_could_not_run_is_exit_code_2(cli, sets: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "tp2": sets["tp2"]}
    code, out, err = cli("verify", *(a.format(**paths) for a in args))
    assert code == 2
    assert out == "" and err.strip()  # one line saying why (typer's usage message for --mode)


def test_help_documents_the_exit_codes(cli) -> None:
    code, out, _ = cli("verify", "--help")
    assert code == 0
    assert "Exit codes: 0 every check passed; 1 a check failed" in " ".join(out.split())


def test_distributed_mode_runs_one_process_per_rank(sets: dict[str, Path]) -> None:
    """Two real gloo processes: the same verdict and, summed in rank order, the simulated numbers."""
    command = [sys.executable, "-m", "tpshard", "verify", str(sets["tp2"]), "--mode", "distributed", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["compared"]["mode"] == "distributed"
    assert report["communication"]["sync_points_measured"] == [2 * N_LAYER]
    assert report["numerics"]["greedy"]["matched"] == report["numerics"]["greedy"]["sequences"]
    # the set keeps wte whole, yet the logits are gathered: the note says why, for a user who never asked
    assert "each rank computes the logits of its share of the vocabulary" in report["communication"]["note"]
