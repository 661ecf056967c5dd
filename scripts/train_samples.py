"""Train the two small sample models shipped in sample_checkpoints/ from a text file (tiny Shakespeare).

    python scripts/train_samples.py /path/to/tinyshakespeare.txt [--only char|bpe] [--out DIR]

- shakespeare_char/ckpt.pt + meta.pkl: nanoGPT's shakespeare_char CPU recipe (4 layers, 4 heads, 128 wide,
  block 64, batch 12, 2000 iters, bias), with nanoGPT's character vocabulary (meta.pkl).
- shakespeare_bpe/ckpt.pt + shakespeare_bpe.tiktoken: no bias, 4 layers, 6 heads, 144 wide, block 128,
  batch 12, 1500 iters, on a 512-token byte-level BPE that this script trains on the training split.

Both use nanoGPT's recipe: 90/10 train/val split, AdamW (betas 0.9/0.99, weight decay 0.1 on matrices),
lr 1e-3 with linear warmup and cosine decay to 1e-4, grad clip 1.0, dropout 0, seed 1337.

The checkpoints have nanoGPT's ckpt.pt layout ({'model', 'optimizer', 'model_args', 'iter_num',
'best_val_loss', 'config'}), with one deliberate difference: 'optimizer' is a valid AdamW state_dict whose
per-parameter state (the two Adam moments) is empty, param_groups kept. The full state would triple the
file (each must stay under 5 MB); nanoGPT resumes from it fine, the moments simply start again from zero.
The text itself is never written next to the checkpoints.
"""

import argparse
import base64
import itertools
import math
import pickle
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import regex
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tpshard.config import GPTConfig
from tpshard.model import GPT
from tpshard.tokenizer import GPT2_PATTERN, Tokenizer, load_meta_pkl, load_tiktoken_file

MAX_BYTES = 5_000_000
SEED = 1337


@dataclass
class Recipe:
    """The hyperparameters, under nanoGPT's config names (stored as the checkpoint's 'config')."""

    dataset: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    bias: bool
    batch_size: int
    max_iters: int
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: max_iters, as nanoGPT's configs set it
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_interval: int = 500
    eval_iters: int = 20  # nanoGPT's CPU recipe; the final figures use final_eval_iters
    final_eval_iters: int = 200
    gradient_accumulation_steps: int = 1
    decay_lr: bool = True
    init_from: str = "scratch"
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False


CHAR = Recipe(
    "shakespeare_char",
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    bias=True,
    batch_size=12,
    max_iters=2000,
)
BPE = Recipe(
    "shakespeare_bpe",
    n_layer=4,
    n_head=6,
    n_embd=144,
    block_size=128,
    bias=False,
    batch_size=12,
    max_iters=1500,
)
BPE_VOCAB = 512


# ---------------------------------------------------------------------------------------------- BPE


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE in tiktoken's ranks form: ranks 0..255 are the single bytes, then one rank per merge,
    in order. tiktoken can encode but not train, so this is hand-written: the classic algorithm (most
    frequent adjacent pair, merged everywhere), run on each unique GPT-2 pre-token once, weighted by its
    count, so it takes seconds."""
    counts = Counter(regex.findall(GPT2_PATTERN, text))
    words = [(list(word.encode("utf-8")), n) for word, n in counts.items()]
    ranks = {bytes([b]): b for b in range(256)}
    token_bytes = [bytes([b]) for b in range(256)]  # rank -> bytes
    while len(ranks) < vocab_size:
        stats: Counter[tuple[int, int]] = Counter()
        for ids, n in words:
            for pair in itertools.pairwise(ids):
                stats[pair] += n
        if not stats:
            raise ValueError(f"the text is too small for {vocab_size} tokens")
        pair = max(stats, key=stats.__getitem__)  # ties: first seen, deterministic
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        # the same bytes can arise from two different pairs: merge them into the one token, as tiktoken would
        if merged not in ranks:
            ranks[merged] = len(token_bytes)
            token_bytes.append(merged)
        words = [(_merge(ids, pair, ranks[merged]), n) for ids, n in words]
    return ranks


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    if pair[0] not in ids:  # most words lack the pair: skip the rebuild
        return ids
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """tiktoken's .tiktoken format: base64 of the token's bytes, a space, its rank; one per line."""
    lines = (
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    path.write_bytes(b"\n".join(lines) + b"\n")


def write_meta(chars: list[str], path: Path) -> None:
    """nanoGPT's data/shakespeare_char/prepare.py meta.pkl."""
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }
    with path.open("wb") as f:
        pickle.dump(meta, f)


# ---------------------------------------------------------------------------------------------- training


def init_weights(model: GPT) -> None:
    """nanoGPT's initialisation (the model class keeps PyTorch's defaults): N(0, 0.02), zero biases, and
    the residual projections scaled down by sqrt(2 * n_layer)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name:  # LayerNorm gains (ln_1, ln_2, ln_f)
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * model.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.normal_(0.0, std)


def make_optimizer(model: GPT, r: Recipe) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=r.learning_rate, betas=(r.beta1, r.beta2))


def lr_at(it: int, r: Recipe) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters."""
    decay_iters = r.lr_decay_iters or r.max_iters
    if it < r.warmup_iters:
        return r.learning_rate * (it + 1) / (r.warmup_iters + 1)
    if it > decay_iters:
        return r.min_lr
    ratio = (it - r.warmup_iters) / (decay_iters - r.warmup_iters)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.learning_rate - r.min_lr)


def get_batch(data: torch.Tensor, r: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - r.block_size, (r.batch_size,))
    x = torch.stack([data[i : i + r.block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + r.block_size] for i in ix])
    return x, y


def loss_of(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, torch.Tensor], r: Recipe, iters: int) -> dict[str, float]:
    model.eval()
    out = {
        name: sum(loss_of(model, *get_batch(data, r)).item() for _ in range(iters)) / iters
        for name, data in splits.items()
    }
    model.train()
    return out


@torch.no_grad()
def sample(model: GPT, tok: Tokenizer, start: str, n: int, temperature: float = 0.8, top_k: int = 200) -> str:
    """nanoGPT's generate: the last block_size tokens as context, temperature, top-k."""
    model.eval()
    gen = torch.Generator().manual_seed(SEED)
    idx = torch.tensor([tok.encode(start)])
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :], last_only=True)[:, -1] / temperature
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits[logits < kth] = -float("inf")
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1, generator=gen)], dim=1)
    return tok.decode(idx[0].tolist())


def train(r: Recipe, tok: Tokenizer, train_ids: list[int], val_ids: list[int], out: Path) -> None:
    torch.manual_seed(SEED)
    splits = {"train": torch.tensor(train_ids), "val": torch.tensor(val_ids)}
    model_args = dict(
        n_layer=r.n_layer,
        n_head=r.n_head,
        n_embd=r.n_embd,
        block_size=r.block_size,
        bias=r.bias,
        vocab_size=tok.vocab_size,
        dropout=r.dropout,
    )
    model = GPT(GPTConfig(**model_args))
    init_weights(model)
    optimizer = make_optimizer(model, r)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {r.dataset}: {n_params:,} parameters, vocab {tok.vocab_size} ({tok.name})")
    print(
        f"   {len(train_ids):,} train / {len(val_ids):,} val tokens; "
        f"{r.max_iters} iters of {r.batch_size} x {r.block_size} tokens"
    )
    start = time.perf_counter()
    for it in range(r.max_iters + 1):
        if it % r.eval_interval == 0 and it < r.max_iters:
            losses = estimate_loss(model, splits, r, r.eval_iters)
            print(
                f"   iter {it:5d}  train {losses['train']:.4f}  val {losses['val']:.4f}  "
                f"{time.perf_counter() - start:6.1f}s",
                flush=True,
            )
        if it == r.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, r)
        loss = loss_of(model, *get_batch(splits["train"], r))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        optimizer.step()
    train_seconds = time.perf_counter() - start
    losses = estimate_loss(model, splits, r, r.final_eval_iters)
    seconds = time.perf_counter() - start

    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {}  # Adam moments dropped to keep the file under 5 MB; param_groups kept
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer_state,
        "model_args": model_args,
        "iter_num": r.max_iters,
        "best_val_loss": torch.tensor(losses["val"]),  # nanoGPT stores the tensor estimate_loss returns
        "config": asdict(r) | {"vocab_size": tok.vocab_size, "out_dir": f"{out.parent.name}/{out.name}"},
    }
    path = out / "ckpt.pt"
    torch.save(checkpoint, path)
    size = path.stat().st_size
    print(f"   final ({r.final_eval_iters} eval batches): train {losses['train']:.4f}  val {losses['val']:.4f}")
    print(f"   {train_seconds:.1f}s training, {seconds:.1f}s with the final eval; {path}: {size / 1e6:.2f} MB")
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size:,} bytes, over the {MAX_BYTES:,} limit")
    print("   sample (temperature 0.8, top_k 200, 200 tokens):\n" + "-" * 80)
    print(sample(model, tok, "\n", 200))
    print("-" * 80)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", type=Path, help="training text, e.g. tinyshakespeare.txt")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_checkpoints")
    parser.add_argument("--only", choices=["char", "bpe"], help="train just one of the two")
    parser.add_argument("--max-iters", type=int, help="override the iterations (for a quick smoke run)")
    args = parser.parse_args(argv)
    text = args.text.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)  # nanoGPT's prepare.py: first 90% train, last 10% val
    train_text, val_text = text[:n], text[n:]
    total = time.perf_counter()
    for recipe in (CHAR, BPE):
        if args.only and not recipe.dataset.endswith(args.only):
            continue
        if args.max_iters:
            recipe.max_iters = args.max_iters
            recipe.eval_interval = max(1, args.max_iters // 4)
        out = args.out / recipe.dataset
        out.mkdir(parents=True, exist_ok=True)
        if recipe is CHAR:
            write_meta(sorted(set(text)), out / "meta.pkl")  # nanoGPT: chars of the whole text
            tok = load_meta_pkl(out / "meta.pkl")
        else:
            t = time.perf_counter()
            ranks = train_bpe(train_text, BPE_VOCAB)
            write_ranks(ranks, out / f"{recipe.dataset}.tiktoken")
            tok = load_tiktoken_file(out / f"{recipe.dataset}.tiktoken")  # through tiktoken, as users load it
            print(
                f"\nBPE: {len(ranks)} tokens trained in {time.perf_counter() - t:.1f}s; "
                f"{len(train_text.encode()) / len(tok.encode(train_text)):.2f} bytes per token"
            )
        train(recipe, tok, tok.encode(train_text), tok.encode(val_text), out)
    print(f"\ntotal {time.perf_counter() - total:.1f}s")


if __name__ == "__main__":
    main()
