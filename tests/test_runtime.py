"""The simulated runtime against the dense model: logits, the KV cache, batches, cropping past block_size,
and the counts the reports print."""

from pathlib import Path

import pytest
import torch

from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.files.checkpoint import Checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.generation import Runner, Sampling, TokenPicker, generate
from tpshard.model import GPT, KVCache
from tpshard.runtime.models import dense_model, simulated_model
from tpshard.runtime.programs import peak_rss_bytes
from tpshard.testing import random_weights

BIAS = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, bias=True)
NO_BIAS = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=6, n_embd=48, bias=False)
CASES = [(BIAS, 1), (BIAS, 2), (BIAS, 4), (NO_BIAS, 3), (NO_BIAS, 6)]
# fp32. Splitting a row-parallel matmul over N ranks and adding the partials reassociates each output's
# sum, so simulated and dense logits (magnitude <= 1 here) differ by a few ulps: ~1e-7 measured for
# every case below. 1e-5 leaves 100x margin, yet a real TP bug (a bias added twice, a head on the
# wrong rank, a cache shared across rows) moves logits by 1e-3 or more.
ATOL = 1e-5


def make_dense(tmp: Path, config: GPTConfig, seed: int = 0) -> Checkpoint:
    model = random_weights(GPT(config), seed=seed)
    path = tmp / "ckpt.pt"
    path.touch()  # split hashes its source file into the manifest
    return Checkpoint(path=path, config=config, state_dict=model.state_dict())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(config, tp) -> (dense GPT, simulated GPT), every shard set split once for the module."""
    built = {}
    for config in (BIAS, NO_BIAS):
        tmp = tmp_path_factory.mktemp("bias" if config.bias else "nobias")
        dense = make_dense(tmp, config)
        for _, tp in (case for case in CASES if case[0] is config):
            split_checkpoint(dense, tp, tmp / f"tp{tp}")
            built[config.bias, tp] = dense_model(dense), simulated_model(ShardSet.open(tmp / f"tp{tp}"))
    return built


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("config", "tp"), CASES, ids=[f"bias{c.bias}-tp{tp}" for c, tp in CASES])
@torch.inference_mode()
def test_simulated_matches_dense(models: dict, config: GPTConfig, tp: int, batch: int) -> None:
    dense, simulated = models[config.bias, tp]
    idx = tokens(batch, 12)
    torch.testing.assert_close(simulated(idx), dense(idx), atol=ATOL, rtol=0)  # prefill, no cache
    caches = KVCache(dense, batch), KVCache(simulated, batch)
    torch.testing.assert_close(simulated(idx[:, :8], caches[1]), dense(idx[:, :8], caches[0]), atol=ATOL, rtol=0)
    for t in range(8, 12):  # cached decode, one token at a time
        step = idx[:, t : t + 1]
        torch.testing.assert_close(simulated(step, caches[1]), dense(step, caches[0]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp", [1, 2])
@torch.inference_mode()
def test_cached_decode_equals_full_recompute(models: dict, tp: int) -> None:
    model = models[True, tp][1]
    idx = tokens(2, 14, seed=1)
    cache = KVCache(model, 2)
    model(idx[:, :5], cache)
    for t in range(5, 14):
        cached = model(idx[:, t : t + 1], cache)[:, -1]
        recomputed = model(idx[:, : t + 1])[:, -1]
        torch.testing.assert_close(cached, recomputed, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_each_row_of_a_batch_is_its_own_sequence(models: dict) -> None:
    """The classic TP bug: a KV cache (or a reduction) mixing the rows of a batch."""
    model = models[False, 3][1]
    idx = tokens(3, 10, seed=2)
    cache = KVCache(model, 3)
    together = [model(idx[:, :6], cache)] + [model(idx[:, t : t + 1], cache) for t in range(6, 10)]
    for row in range(3):
        alone_cache = KVCache(model, 1)
        alone = [model(idx[row : row + 1, :6], alone_cache)]
        alone += [model(idx[row : row + 1, t : t + 1], alone_cache) for t in range(6, 10)]
        for step_together, step_alone in zip(together, alone, strict=True):
            torch.testing.assert_close(step_together[row : row + 1], step_alone, atol=ATOL, rtol=0)


def nanogpt_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, pick) -> list[int]:
    """nanoGPT's generate: no cache, the whole (cropped) context recomputed at every step."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, pick(logits[:, -1])[:, None]], dim=1)
    return idx[0].tolist()


@pytest.mark.parametrize("n", [7, 2 * BIAS.block_size], ids=["within-block", "past-block"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("tp", [1, 4])
@torch.inference_mode()
def test_generation_matches_nanogpt(models: dict, tp: int, greedy: bool, n: int) -> None:
    """7 tokens: the cache is sized to the 11 tokens fed. 32: well past the 16-token window, every
    step after the 11th crops and recomputes."""
    dense, simulated = models[True, tp]
    prompt = tokens(1, 5, seed=3)
    sampling = Sampling(greedy=greedy, temperature=1.0, top_k=None, seed=7)
    expected = nanogpt_generate(dense, prompt, n, TokenPicker(sampling))
    got = [int(t) for t in generate(simulated, prompt, n, TokenPicker(sampling))]
    assert prompt[0].tolist() + got == expected


@torch.inference_mode()
def test_generate_runs_one_forward_per_token(models: dict) -> None:
    """Consumed to the end (list()), generate still computes no logits after the last token."""
    model = models[True, 2][1]
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: forwards.append(args[0].size(1)))
    try:
        got = list(generate(model, tokens(1, 6), 4, TokenPicker(Sampling(greedy=True))))
    finally:
        hook.remove()
    assert len(got) == 4 and forwards == [6, 1, 1, 1]


@torch.inference_mode()
def test_runner_counts_what_it_did(models: dict) -> None:
    model = models[True, 2][1]
    model.comm.reset()
    runner = Runner(model, Sampling(greedy=True))
    prompt = tokens(1, 6)[0].tolist()
    out = list(runner.sample(prompt, 5)) + list(runner.sample(prompt, 5))
    stats = runner.stats()
    assert len(out) == stats.new_tokens == stats.forwards == 10 and stats.samples == 2
    assert stats.sync_points == 2 * BIAS.n_layer * stats.forwards
    # per sample: the prompt's 6 positions, then 4 one-token steps, each [1, T, C] fp32 per sync point
    assert stats.sync_bytes == 2 * (2 * BIAS.n_layer * (6 + 4) * BIAS.n_embd * 4)
    assert stats.comm_seconds == 0.0 and stats.prefill_seconds > 0 and stats.decode_tokens_per_second > 0
    assert out[:5] == out[5:]  # greedy: the same prompt, the same text


def test_dense_model_from_merged_shards(tmp_path: Path) -> None:
    dense = make_dense(tmp_path, NO_BIAS, seed=5)
    split_checkpoint(dense, 3, tmp_path / "tp3")
    merged = dense_model(ShardSet.open(tmp_path / "tp3"))
    assert merged.placement.tp_size == 1
    idx = tokens(1, 9)
    with torch.inference_mode():
        assert torch.equal(merged(idx), dense_model(dense)(idx))  # merging is exact


def test_peak_rss_is_in_bytes() -> None:
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert block.numel() < peak_rss_bytes() < (64 << 30)
