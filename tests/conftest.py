"""Shared fixtures: tiny random nanoGPT checkpoints, written the way nanoGPT's train.py writes ckpt.pt:

    {
        "model": raw_model.state_dict(),        nanoGPT's names; lm_head.weight shares wte's storage
        "optimizer": optimizer.state_dict(),    a real AdamW state after one training step, with
                                                nanoGPT's two param groups (decay: dim >= 2, no decay)
        "model_args": {n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout},
        "iter_num": int,
        "best_val_loss": 0-d tensor,            as estimate_loss() returns it
        "config": {...},                        train.py's globals: dataset, learning_rate, ...
    }

Variants (write_nanogpt_checkpoint's keywords):
    compiled=True       every model key prefixed with "_orig_mod." (saved from a torch.compile'd model)
    mask_buffers=True   each block's "attn.bias" causal-mask buffer (PyTorch without flash attention)
    optimizer=False     no optimizer entry;  tokenizer=False  no meta.pkl beside ckpt.pt

Session-scoped fixtures are shared by every test of the run: read them, never modify them (copy the
directory first, or use `make_checkpoint`, which writes into the test's own tmp_path).

Also here: `template` and `w`, a split set to copy and damage; `cli`, tpshard's entry point run
in-process; `nanogpt`, nanoGPT's own GPT as a reference.
"""

import gc
import math
import pickle
import shutil
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from tpshard.cli.main import main
from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.files.checkpoint import model_args
from tpshard.files.paths import load_checkpoint
from tpshard.model import GPT
from tpshard.testing import random_weights

CHARS = string.printable[:96]  # a char vocabulary, as nanoGPT's shakespeare_char meta.pkl holds one
# 4 heads with biases (tp 1, 2, 4) and 6 heads without (tp 2, 3, 6): both of nanoGPT's layouts
BIAS_CONFIG = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32, bias=True)
NO_BIAS_CONFIG = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=6, n_embd=48, bias=False)
ITER_NUM = 250
BEST_VAL_LOSS = 2.5


def train_config(config: GPTConfig) -> dict:
    """The `config` entry: nanoGPT's train.py saves its globals (the configurable keys) like this."""
    return {
        "out_dir": "out",
        "eval_interval": 250,
        "log_interval": 10,
        "eval_iters": 200,
        "eval_only": False,
        "always_save_checkpoint": False,
        "init_from": "scratch",
        "wandb_log": False,
        "wandb_project": "owt",
        "wandb_run_name": "gpt2",
        "dataset": "tpshard_test_chars",  # data/<dataset>/meta.pkl is looked for: a name that exists nowhere
        "gradient_accumulation_steps": 1,
        "batch_size": 4,
        "block_size": config.block_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "dropout": 0.0,
        "bias": config.bias,
        "learning_rate": 1e-3,
        "max_iters": 5000,
        "weight_decay": 1e-1,
        "beta1": 0.9,
        "beta2": 0.99,
        "grad_clip": 1.0,
        "decay_lr": True,
        "warmup_iters": 100,
        "lr_decay_iters": 5000,
        "min_lr": 1e-4,
        "backend": "nccl",
        "device": "cpu",
        "dtype": "float32",
        "compile": False,
    }


def trained_one_step(config: GPTConfig, seed: int) -> tuple[GPT, torch.optim.AdamW]:
    """A random model after one AdamW step, with nanoGPT's configure_optimizers param groups."""
    with torch.random.fork_rng():  # seeded, without moving the global RNG under other tests
        torch.manual_seed(seed)
        return _train_one_step(config, seed)


def _train_one_step(config: GPTConfig, seed: int) -> tuple[GPT, torch.optim.AdamW]:
    model = random_weights(GPT(config), seed=seed)
    params = dict(model.named_parameters())  # the tied lm_head appears once, as wte
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    x = torch.randint(config.vocab_size, (2, config.block_size))
    y = torch.randint(config.vocab_size, (2, config.block_size))
    loss = F.cross_entropy(model(x).view(-1, config.vocab_size), y.view(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval(), optimizer


def nanogpt_state_dict(model: GPT, *, compiled: bool = False, mask_buffers: bool = False) -> dict:
    """The model's state_dict as nanoGPT's raw_model.state_dict() has it, for the given variant."""
    block_size = model.config.block_size
    mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
    state = {}
    for name, tensor in model.state_dict().items():
        if mask_buffers and name.endswith(".attn.c_attn.weight"):  # a module's own buffers precede its children's
            state[name.removesuffix("c_attn.weight") + "bias"] = mask
        state[name] = tensor
    prefix = "_orig_mod." if compiled else ""
    return {prefix + name: tensor for name, tensor in state.items()}


def write_nanogpt_checkpoint(
    folder: Path,
    config: GPTConfig = BIAS_CONFIG,
    *,
    seed: int = 0,
    compiled: bool = False,
    mask_buffers: bool = False,
    optimizer: bool = True,
    tokenizer: bool = True,
) -> Path:
    """folder/ckpt.pt in train.py's layout (see the module docstring), and a char meta.pkl beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model, adamw = trained_one_step(config, seed)
    ckpt = {
        "model": nanogpt_state_dict(model, compiled=compiled, mask_buffers=mask_buffers),
        "optimizer": adamw.state_dict(),
        "model_args": model_args(config),
        "iter_num": ITER_NUM,
        "best_val_loss": torch.tensor(BEST_VAL_LOSS),
        "config": train_config(config),
    }
    if not optimizer:
        del ckpt["optimizer"]
    torch.save(ckpt, folder / "ckpt.pt")
    if tokenizer:
        chars = CHARS[: config.vocab_size]
        meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
        (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return folder / "ckpt.pt"


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """make_checkpoint(config=BIAS_CONFIG, name="model", **variants) -> tmp_path/name/ckpt.pt, fresh."""

    def make(config: GPTConfig = BIAS_CONFIG, name: str = "model", **variants) -> Path:
        return write_nanogpt_checkpoint(tmp_path / name, config, **variants)

    return make


@pytest.fixture(scope="session")
def bias_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BIAS_CONFIG (4 heads, biases), with optimizer state and meta.pkl. Read-only."""
    return write_nanogpt_checkpoint(tmp_path_factory.mktemp("bias"), BIAS_CONFIG)


@pytest.fixture(scope="session")
def nobias_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NO_BIAS_CONFIG (6 heads, bias=False), with optimizer state and meta.pkl. Read-only."""
    return write_nanogpt_checkpoint(tmp_path_factory.mktemp("nobias"), NO_BIAS_CONFIG, seed=1)


@pytest.fixture(scope="session")
def compiled_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bias_ckpt's weights saved from a torch.compile'd model: every key prefixed "_orig_mod.". Read-only."""
    return write_nanogpt_checkpoint(tmp_path_factory.mktemp("compiled"), BIAS_CONFIG, compiled=True)


@pytest.fixture(scope="session")
def mask_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bias_ckpt's weights plus nanoGPT's attn.bias causal-mask buffers. Read-only."""
    return write_nanogpt_checkpoint(tmp_path_factory.mktemp("mask"), BIAS_CONFIG, mask_buffers=True)


@pytest.fixture(scope="module")
def template(bias_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bias_ckpt's folder copied, and split 2 ways with its meta.pkl: root/model/, root/shards/. Read-only."""
    root = tmp_path_factory.mktemp("hardening")
    shutil.copytree(bias_ckpt.parent, root / "model")
    ckpt = load_checkpoint(root / "model" / "ckpt.pt")
    split_checkpoint(ckpt, 2, root / "shards", tokenizer_file=root / "model" / "meta.pkl")
    return root


@pytest.fixture
def w(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template, for this test to damage (links copied as links)."""
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """cli(*args) -> (exit code, stdout, stderr) of tpshard's real entry point, main(), run in this
    process: errors are printed and mapped to exit codes exactly as the installed command does."""

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what came before
        monkeypatch.setattr(sys, "argv", ["tpshard", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            gc.unfreeze()  # main() freezes the objects of a process it ends: this one goes on
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --- nanoGPT's own model, as a reference -----------------------------------------------------------
# The module structure and forward pass of nanoGPT's model.py (flash-attention path, dropout 0), kept
# independent of tpshard.model so that tests can hold tpshard to nanoGPT's names and numbers.


@dataclass
class NanoGPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoMLP(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.ln_1 = NanoLayerNorm(config.n_embd, bias=config.bias)
        self.attn = NanoAttention(config)
        self.ln_2 = NanoLayerNorm(config.n_embd, bias=config.bias)
        self.mlp = NanoMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([NanoBlock(config) for _ in range(config.n_layer)]),
                ln_f=NanoLayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for pn, p in self.named_parameters():  # nanoGPT's init, scaled residual projections
            std = 0.02 / math.sqrt(2 * config.n_layer) if pn.endswith("c_proj.weight") else 0.02
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of every position (nanoGPT's training-mode output)."""
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.fixture(scope="session")
def nanogpt() -> Callable[[dict], NanoGPT]:
    """nanogpt(model_args) -> nanoGPT's GPT(GPTConfig(**model_args)), as sample.py builds it."""
    return lambda args: NanoGPT(NanoGPTConfig(**args))
