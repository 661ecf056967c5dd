"""verify --oracle torch: the shard set's weights through PyTorch's own tensor parallelism (parallelize_module
on a reference nanoGPT, loaded from the DCP export, 2 gloo processes), its logits held against tpshard's
sharded run and the dense model: it agrees on both sample checkpoints, and it catches the classic mistake
of a plain ColwiseParallel on nanoGPT's fused c_attn (contiguous rows: rank 0 would get all of q and half
of k), which verify must fail on."""

import json
from pathlib import Path

import pytest

from tpshard.files.dcp import FUSED
from tpshard.verify import oracle

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


# the BPE sample (6 heads, no biases) is marked slow only for time: each run starts 2 processes that import torch
@pytest.mark.parametrize("sample", ["shakespeare_char", pytest.param("shakespeare_bpe", marks=pytest.mark.slow)])
def test_oracle_agrees_on_the_samples(cli, tmp_path: Path, sample: str) -> None:
    shards, html = tmp_path / "shards", tmp_path / "report.html"
    assert cli("split", SAMPLES / sample / "ckpt.pt", "--tp", 2, "-o", shards)[0] == 0
    code, out, err = cli("verify", shards, "--oracle", "torch", "--batch", 2, "--tokens", 4, "--json", "--html", html)
    assert code == 0, out + err
    report = json.loads(out)  # --json: stdout holds the JSON alone
    torch_side = report["oracle"]
    assert torch_side["passed"] and torch_side["skipped"] is None and torch_side["processes"] == 2
    assert torch_side["vs_sharded_outside"] == 0 and torch_side["vs_dense_outside"] == 0
    # fp32, default tolerance atol 1e-4: measured at most 4e-6 on both samples (|logits| up to ~12; the bias-free
    # one exactly equal to the sharded run), 25x inside; a wrong cut of c_attn moves logits by ~0.1 to ~10
    assert torch_side["vs_sharded_max_abs"] < 2e-5 and torch_side["vs_dense_max_abs"] < 2e-5
    assert torch_side["plan"]["attn.c_attn"].startswith("ColwiseParallel on each of q, k, v")
    assert "torch oracle" in report["summary"]
    page = html.read_text()
    assert "4. torch oracle" in page and "parallelize_module on 2 processes (gloo)" in page


def test_plain_colwise_on_fused_c_attn_is_caught(cli, template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle built wrong on purpose: PyTorch's ColwiseParallel straight on the (3C, C) c_attn."""
    monkeypatch.setattr(oracle, "QKV", FUSED)
    code, out, err = cli("verify", template / "shards", "--oracle", "torch", "--batch", 2, "--tokens", 2)
    assert code == 1 and "Traceback" not in err, out + err
    assert "4. torch oracle  FAIL" in out and "contiguous rows, q, k, v mixed" in out
    summary = " ".join(out.split("\nFAIL  ")[-1].split())
    assert ("FAIL  " + summary).startswith(
        "FAIL  torch oracle: PyTorch's tensor parallelism and tpshard's sharded run disagree"
    )
    assert "numerics" not in summary  # tpshard's own parts still hold: only the oracle tells the cut apart


def test_oracle_skipped_when_integrity_fails(cli, w: Path) -> None:
    rank = w / "shards" / "rank1-of-2.safetensors"
    rank.write_bytes(rank.read_bytes()[:-8])
    code, out, _ = cli("verify", w / "shards", "--oracle", "torch", "--json")
    report = json.loads(out)
    assert code == 1 and report["oracle"] == {
        **report["oracle"],
        "passed": False,
        "skipped": "skipped: integrity failed",
    }
    assert report["summary"].endswith("numerics and communication skipped (and the torch oracle)")


def test_unknown_oracle(cli, template: Path) -> None:
    code, out, err = cli("verify", template / "shards", "--oracle", "jax")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--oracle" in err
