"""Vocab-parallel splits (Megatron's VocabParallelEmbedding): wte / lm_head split by padded vocabulary
rows, the padding recorded and removed on merge, the same logits as dense."""

import json
from pathlib import Path

import pytest
import torch

from tpshard.comm.collectives import LOCAL
from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import merge_shards, reshard, split_checkpoint
from tpshard.files.checkpoint import Checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.parallel import plan
from tpshard.runtime.models import dense_model, sharded_model
from tpshard.testing import random_weights

# vocab 101 is prime: every tp size > 1 needs padding rows
CONFIG = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=6, n_embd=48, bias=False)
# fp32; the vocab-parallel embedding sum adds exact zeros, the blocks reassociate sums across ranks
# as any TP split does: errors of a few ulps on logits of order 1, so 1e-5 leaves a wide margin.
ATOL = 1e-5


@pytest.fixture
def dense(tmp_path: Path) -> Checkpoint:
    model = random_weights(GPT(CONFIG), seed=torch.seed() % 2**31)
    return Checkpoint(path=tmp_path / "ckpt.pt", config=CONFIG, state_dict=model.state_dict())


def split(dense: Checkpoint, tmp_path: Path, tp: int, name: str = "vp") -> ShardSet:
    dense.path.touch()  # the source file is hashed into the manifest
    split_checkpoint(dense, tp, tmp_path / f"{name}{tp}", vocab_parallel=True)
    return ShardSet.open(tmp_path / f"{name}{tp}")


@pytest.mark.parametrize("tp", [2, 3, 6])
def test_round_trip_drops_padding(dense: Checkpoint, tmp_path: Path, tp: int) -> None:
    shards = split(dense, tmp_path, tp)
    manifest = json.loads((shards.directory / "manifest.json").read_text())
    padded = plan.vocab_slice(101, tp) * tp
    assert manifest["vocab_parallel"] is True and manifest["vocab_padding"] == padded - 101
    assert manifest["tensors"]["transformer.wte.weight"]["rule"] == "vocab"
    pieces = shards.load_pieces(list(range(tp)))["transformer.wte.weight"]
    assert all(p.shape == (padded // tp, 48) for p in pieces)
    assert torch.count_nonzero(pieces[-1][101 - (tp - 1) * (padded // tp) :]) == 0  # the padding is zeros
    merged = merge_shards(shards)
    for name, tensor in dense.state_dict.items():
        assert torch.equal(merged.state_dict[name], tensor), name


def test_reshard_equals_direct_split(dense: Checkpoint, tmp_path: Path) -> None:
    reshard(split(dense, tmp_path, 2), 3, tmp_path / "re3")
    direct = split(dense, tmp_path, 3)
    for rank in range(3):
        name = f"rank{rank}-of-3.safetensors"
        assert (tmp_path / "re3" / name).read_bytes() == (direct.directory / name).read_bytes()


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_simulated_logits_match_dense(dense: Checkpoint, tmp_path: Path, tp: int) -> None:
    reduce = CountingCollectives(LOCAL)
    model = sharded_model(split(dense, tmp_path, tp), list(range(tp)), reduce)
    idx = torch.randint(0, CONFIG.vocab_size, (3, 20))
    with torch.no_grad():
        logits = model(idx)
        expected = dense_model(dense)(idx)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert reduce.calls == plan.sync_points(CONFIG, vocab_parallel=True) == 2 * CONFIG.n_layer + 1


def test_each_rank_holds_a_slice_of_the_embedding(dense: Checkpoint, tmp_path: Path) -> None:
    vocab = split(dense, tmp_path, 3).manifest
    replicated = split_checkpoint(dense, 3, tmp_path / "plain3")

    def data_bytes(manifest) -> int:  # per rank, without the safetensors header
        return sum(torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape in manifest.layout())

    saved = data_bytes(replicated) - data_bytes(vocab)
    assert saved == (101 - plan.vocab_slice(101, 3)) * CONFIG.n_embd * 4  # 101 rows -> 34 rows per rank
    assert abs(replicated.files[0]["bytes"] - vocab.files[0]["bytes"] - saved) < 64  # header size aside
