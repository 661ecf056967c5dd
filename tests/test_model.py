"""The dense GPT against nanoGPT: parameter names, tied weights, the same logits, and the KV cache."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import BIAS_CONFIG, NO_BIAS_CONFIG

from tpshard.config import GPTConfig
from tpshard.files.checkpoint import model_args
from tpshard.model import GPT, KVCache
from tpshard.parallel.plan import TIED, dense_shapes
from tpshard.testing import random_weights

# nanoGPT's GPT(GPTConfig(n_layer=2, bias=True)).state_dict().keys(), in order (flash attention: no
# attn.bias mask buffers). With bias=False every name ending in ".bias" is absent: nanoGPT's LayerNorm
# then holds bias = None, which is not a parameter, and nn.Linear(bias=False) registers none.
NANOGPT_NAMES = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.weight",
    "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight",
    "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.0.mlp.c_proj.bias",
    "transformer.h.1.ln_1.weight",
    "transformer.h.1.ln_1.bias",
    "transformer.h.1.attn.c_attn.weight",
    "transformer.h.1.attn.c_attn.bias",
    "transformer.h.1.attn.c_proj.weight",
    "transformer.h.1.attn.c_proj.bias",
    "transformer.h.1.ln_2.weight",
    "transformer.h.1.ln_2.bias",
    "transformer.h.1.mlp.c_fc.weight",
    "transformer.h.1.mlp.c_fc.bias",
    "transformer.h.1.mlp.c_proj.weight",
    "transformer.h.1.mlp.c_proj.bias",
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
    "lm_head.weight",
]
# fp32 throughout. The same weights through two code paths (one T-token matmul vs T one-token matmuls
# with a cache; nanoGPT's is_causal attention vs an explicit mask) may reorder float sums inside the
# kernels: measured, the cache differs by at most 2e-7 on these logits (|logit| < 1) and nanoGPT by 0.
# 1e-5 keeps 50x margin, while a real bug (a stale cache entry, a wrong position, a row leaking into
# another) moves logits by 1e-2 or more.
ATOL = 1e-5


def tokens(batch: int, length: int, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def parameter_count(config: GPTConfig) -> int:
    """Parameters of the dense model, the tied embedding counted once, from a model built on meta."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


@pytest.mark.parametrize("config", [BIAS_CONFIG, NO_BIAS_CONFIG], ids=["bias", "no-bias"])
def test_state_dict_names_are_nanogpts(config: GPTConfig, nanogpt) -> None:
    expected = [n for n in NANOGPT_NAMES if config.bias or not n.endswith(".bias")]
    assert list(GPT(config).state_dict()) == expected
    assert list(nanogpt(model_args(config)).state_dict()) == expected  # the list above is nanoGPT's own


@pytest.mark.parametrize("config", [BIAS_CONFIG, NO_BIAS_CONFIG, GPTConfig()], ids=["bias", "no-bias", "gpt2"])
def test_plan_shapes_are_the_models(config: GPTConfig) -> None:
    """plan.dense_shapes writes the layout out (no model built): it must be the model's, in order."""
    with torch.device("meta"):
        state = GPT(config).state_dict()
    assert list(dense_shapes(config).items()) == [(n, tuple(t.shape)) for n, t in state.items() if n not in TIED]
    assert sum(map(math.prod, dense_shapes(config).values())) == parameter_count(config)


@pytest.mark.parametrize("config", [BIAS_CONFIG, NO_BIAS_CONFIG], ids=["bias", "no-bias"])
@torch.inference_mode()
def test_same_logits_as_nanogpt(config: GPTConfig, nanogpt) -> None:
    ours = random_weights(GPT(config), seed=3).eval()
    reference = nanogpt(model_args(config)).eval()
    reference.load_state_dict(ours.state_dict())  # strict: every name and shape agrees
    idx = tokens(2, config.block_size)
    torch.testing.assert_close(ours(idx), reference(idx), atol=ATOL, rtol=0)


def test_lm_head_is_tied_to_wte() -> None:
    model = GPT(BIAS_CONFIG)
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert parameter_count(BIAS_CONFIG) == sum(unique.values()) == sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()


@torch.inference_mode()
def test_from_state_dict_keeps_the_tie() -> None:
    """from_state_dict assigns the tensors (no copy): lm_head must still be wte afterwards."""
    dense = random_weights(GPT(BIAS_CONFIG), seed=1)
    model = GPT.from_state_dict(BIAS_CONFIG, dense.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = tokens(1, 8)
    before = model(idx)
    model.transformer.wte.weight.mul_(2.0)  # the output layer must see it too
    assert not torch.allclose(model(idx), before)


@pytest.mark.parametrize("config", [BIAS_CONFIG, NO_BIAS_CONFIG], ids=["bias", "no-bias"])
@torch.inference_mode()
def test_cached_decode_equals_full_recompute(config: GPTConfig) -> None:
    model = random_weights(GPT(config), seed=2).eval()
    idx = tokens(1, config.block_size, seed=5)
    cache = KVCache(model, 1)
    prefill = model(idx[:, :7], cache)
    torch.testing.assert_close(prefill, model(idx[:, :7]), atol=ATOL, rtol=0)
    for t in range(7, config.block_size):  # one token at a time, up to a full block
        step = model(idx[:, t : t + 1], cache)[:, -1]
        full = model(idx[:, : t + 1])[:, -1]  # nanoGPT's way: the whole prefix again
        torch.testing.assert_close(step, full, atol=ATOL, rtol=0)
    assert cache.length == config.block_size
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(idx[:, :1], cache)


@torch.inference_mode()
def test_batch_rows_are_independent() -> None:
    """Three rows prefilled and decoded together give each row's own logits: no row sees another's
    keys, and the cache keeps rows apart."""
    model = random_weights(GPT(BIAS_CONFIG), seed=4).eval()
    idx = tokens(3, 16, seed=6)
    cache = KVCache(model, 3)
    batched = [model(idx[:, :10], cache)[:, -1]] + [model(idx[:, t : t + 1], cache)[:, -1] for t in range(10, 16)]
    for row in range(3):
        alone = KVCache(model, 1)
        single = [model(idx[row : row + 1, :10], alone)[:, -1]]
        single += [model(idx[row : row + 1, t : t + 1], alone)[:, -1] for t in range(10, 16)]
        for got, want in zip(batched, single, strict=True):
            torch.testing.assert_close(got[row], want[0], atol=ATOL, rtol=0)
    changed = idx.clone()
    changed[1] = tokens(1, 16, seed=7)  # another sequence in row 1 only
    again = model(changed)[:, -1]
    torch.testing.assert_close(again[[0, 2]], model(idx)[:, -1][[0, 2]], atol=0, rtol=0)
    assert not torch.allclose(again[1], batched[-1][1])


def test_building_on_meta_keeps_dynamo_out() -> None:
    """Every rank process builds its GPT on the meta device; nn.Embedding's default init would import
    torch._dynamo there (about 2 s and 70 MB per process). A fresh interpreter shows whether it does."""
    code = (
        "import sys, torch\n"
        "from tpshard.config import GPTConfig\n"
        "from tpshard.model import GPT\n"
        "from tpshard.testing import random_weights\n"
        "config = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11, block_size=4)\n"
        "state = random_weights(GPT(config)).state_dict()\n"
        "GPT.from_state_dict(config, state)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
