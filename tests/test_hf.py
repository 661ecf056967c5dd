"""Hugging Face GPT-2 directories in and out, checked against an independent GPT-2 forward written
directly on HF's tensor layout, and against transformers itself where it is installed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from tpshard.errors import TpshardError
from tpshard.files.hf import hf_state_dict, load_hf
from tpshard.files.paths import load_checkpoint
from tpshard.runtime.models import dense_model

HF = dict(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=6, layer_norm_epsilon=1e-5)
# fp32 throughout. tpshard and the references run the same operations in a different order
# (fused vs unfused bias adds, SDPA vs explicit softmax), so logits of size ~1 agree to ~1e-6;
# 1e-5 is ten times that and still far below the activation difference tested below (~1e-3).
ATOL = 1e-5


def random_hf_state(seed: int, *, prefix: str = "", with_buffers: bool = True) -> dict[str, torch.Tensor]:
    """GPT-2 weights in HF's layout: Conv1D weights are [in, out]."""
    gen = torch.Generator().manual_seed(seed)
    C, V, T = HF["n_embd"], HF["vocab_size"], HF["n_positions"]

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    state = {"wte.weight": rnd(V, C), "wpe.weight": rnd(T, C), "ln_f.weight": 1 + rnd(C), "ln_f.bias": rnd(C)}
    for i in range(HF["n_layer"]):
        p = f"h.{i}."
        state |= {
            p + "ln_1.weight": 1 + rnd(C),
            p + "ln_1.bias": rnd(C),
            p + "attn.c_attn.weight": rnd(C, 3 * C),
            p + "attn.c_attn.bias": rnd(3 * C),
            p + "attn.c_proj.weight": rnd(C, C),
            p + "attn.c_proj.bias": rnd(C),
            p + "ln_2.weight": 1 + rnd(C),
            p + "ln_2.bias": rnd(C),
            p + "mlp.c_fc.weight": rnd(C, 4 * C),
            p + "mlp.c_fc.bias": rnd(4 * C),
            p + "mlp.c_proj.weight": rnd(4 * C, C),
            p + "mlp.c_proj.bias": rnd(C),
        }
        if with_buffers:
            state[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            state[p + "attn.masked_bias"] = torch.tensor(-1e4)
    return {prefix + k: v for k, v in state.items()}


def write_hf_dir(path: Path, state: dict, *, activation: str = "gelu_new", bin_file: bool = False) -> Path:
    path.mkdir()
    config = {"model_type": "gpt2", "activation_function": activation, **HF}
    (path / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def reference_logits(state: dict, idx: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GPT-2 as in the paper and HF's modeling code, on HF's layout (x @ W + b for Conv1D)."""
    C, H = HF["n_embd"], HF["n_head"]
    B, T = idx.shape
    s = {k.removeprefix("transformer."): v for k, v in state.items()}

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(x, (C,), s[p + ".weight"], s[p + ".bias"], HF["layer_norm_epsilon"])

    def gelu(x: torch.Tensor) -> torch.Tensor:
        if approximate == "tanh":
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    x = s["wte.weight"][idx] + s["wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(HF["n_layer"]):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ s[p + "attn.c_attn.weight"] + s[p + "attn.c_attn.bias"]
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ s[p + "attn.c_proj.weight"] + s[p + "attn.c_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ s[p + "mlp.c_fc.weight"] + s[p + "mlp.c_fc.bias"])
        x = x + h @ s[p + "mlp.c_proj.weight"] + s[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ s["wte.weight"].T


@pytest.mark.parametrize(("prefix", "bin_file"), [("", False), ("transformer.", True)])
def test_import_matches_reference(tmp_path: Path, prefix: str, bin_file: bool) -> None:
    state = random_hf_state(seed=torch.seed() % 2**31, prefix=prefix)
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "gpt2", state, bin_file=bin_file))
    assert ckpt.config.activation == "gelu_new"
    assert ckpt.config.block_size == HF["n_positions"]
    idx = torch.randint(0, HF["vocab_size"], (2, 24))
    with torch.no_grad():
        logits = dense_model(ckpt)(idx)
    torch.testing.assert_close(logits, reference_logits(state, idx), atol=ATOL, rtol=0)
    # the activation matters: the exact GELU gives measurably different logits
    assert (reference_logits(state, idx, approximate="none") - logits).abs().max() > 10 * ATOL


def test_lm_head_tied_when_absent_and_checked_when_present(tmp_path: Path) -> None:
    state = random_hf_state(seed=1)
    ckpt = load_hf(write_hf_dir(tmp_path / "a", state))
    assert ckpt.state_dict["lm_head.weight"] is ckpt.state_dict["transformer.wte.weight"]
    untied = state | {"lm_head.weight": state["wte.weight"] + 1}
    with pytest.raises(TpshardError, match=r"lm_head\.weight differs"):
        load_hf(write_hf_dir(tmp_path / "b", untied))


def test_export_round_trip_through_shards(tmp_path: Path) -> None:
    """HF dir -> split tp 2 -> merge --format hf: the same tensors in HF layout, bit for bit."""
    state = random_hf_state(seed=2, with_buffers=False)
    source = write_hf_dir(tmp_path / "gpt2", state)
    run = [sys.executable, "-m", "tpshard"]
    subprocess.run([*run, "split", str(source), "--tp", "2", "-o", str(tmp_path / "shards")], check=True)
    subprocess.run([*run, "merge", str(tmp_path / "shards"), "-o", str(tmp_path / "out"), "--format", "hf"], check=True)
    back = load_hf(tmp_path / "out")
    assert back.config == load_hf(source).config
    exported = hf_state_dict(back)
    assert exported.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(exported[key], tensor), key


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    path = write_hf_dir(tmp_path / "gpt2", random_hf_state(seed=3), activation="relu")
    result = subprocess.run(
        [sys.executable, "-m", "tpshard", "split", str(path), "--tp", "2", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "activation_function 'relu' is not supported" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_against_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers not installed; reference test covers it")
    config = transformers.GPT2Config(**HF)
    ref = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "hf")
    ckpt = load_checkpoint(tmp_path / "hf")
    idx = torch.randint(0, HF["vocab_size"], (2, 24))
    with torch.no_grad():
        expected = ref(idx).logits
        torch.testing.assert_close(dense_model(ckpt)(idx), expected, atol=ATOL, rtol=0)
        from tpshard.files.hf import save_hf

        save_hf(ckpt, tmp_path / "out")
        again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(again(idx).logits, expected, atol=0, rtol=0)


def write_hf_vocab(folder: Path) -> None:
    """A tiny GPT-2-format BPE: the 256 byte tokens in GPT-2's order, then three merges."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order = printable + [b for b in range(256) if b not in printable]
    to_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(order[len(printable) :])}
    space = to_char[ord(" ")]
    merges = [("h", "e"), (space, "t"), (space + "t", "he")]
    vocab = {to_char[b]: rank for rank, b in enumerate(order)}
    for first, second in merges:
        vocab[first + second] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_hf_vocab_tokenizes_offline_and_ships_with_shards(tmp_path: Path) -> None:
    from tpshard.tokenizer import find_tokenizer

    source = write_hf_dir(tmp_path / "gpt2", random_hf_state(seed=4))
    write_hf_vocab(source)
    tok = find_tokenizer(source / "model.safetensors", dataset=None, vocab_size=HF["vocab_size"])
    ids = tok.encode("the the")
    assert ids[-1] == 258 and tok.decode(ids) == "the the"  # " the" is the last merge, one token
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "tpshard", "split", str(source), "--tp", "2", "-o", str(shards)], check=True)
    assert (shards / "tokenizer.tiktoken").is_file()
    shipped = find_tokenizer(shards, dataset=None, vocab_size=HF["vocab_size"])
    assert shipped.encode("the the") == ids
