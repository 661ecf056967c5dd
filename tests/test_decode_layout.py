"""The decode layout (tpshard/parallel/layers.py): weights stored the way a decode step streams them
fastest, and tpshard's linear splitting a decode step over the threads, are the same model:

- the parameters keep their names, shapes and values (only the strides differ), the embedding stays
  tied to the output layer;
- `linear` is F.linear in either layout, for any rows and threads;
- logits as nanoGPT's, through prefill and the KV cache, dense, simulated and distributed, on 1 and 2
  threads (the split sums each product in 2 halves: a reassociation, measured at 1e-6 on these
  models' logits; held to the 1e-5 that tests/test_model.py holds the plain layout to, and in
  distributed runs to verify's documented float32 tolerance, atol 1e-4 + rtol 1e-5);
- memory: the transposed copies replace the memory-mapped weights, they do not add to them (a
  process's peak RSS grows by at most 1.1x the weights it holds), and only pages backed by the
  file, never data, are dropped.
"""

import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import BIAS_CONFIG, NO_BIAS_CONFIG
from torch.nn import functional as F

from tpshard.config import GPTConfig
from tpshard.convert import split_checkpoint
from tpshard.files import pages
from tpshard.files.checkpoint import model_args
from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT, KVCache
from tpshard.parallel import layers
from tpshard.runtime.models import dense_model, simulated_model
from tpshard.testing import random_weights

ATOL = 1e-5  # as tests/test_model.py against nanoGPT; measured ~1e-6 with the split
TRANSPOSED = ("attn.c_attn.weight", "mlp.c_fc.weight", "lm_head.weight", "transformer.wte.weight")  # out > in


@pytest.fixture
def threads():
    """torch.set_num_threads, restored after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def tokens(batch: int, length: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [BIAS_CONFIG, NO_BIAS_CONFIG], ids=["bias", "no-bias"])
def test_the_layout_keeps_names_shapes_values_and_the_tie(config: GPTConfig) -> None:
    plain = random_weights(GPT(config), seed=1)
    want = {name: t.clone() for name, t in plain.state_dict().items()}
    model = GPT.from_state_dict(config, plain.state_dict())
    got = model.state_dict()
    assert list(got) == list(want)
    for name, tensor in got.items():
        assert tensor.shape == want[name].shape and torch.equal(tensor, want[name]), name
        stored_transposed = tensor.dim() == 2 and tensor.stride() == (1, tensor.size(0))
        assert stored_transposed == name.endswith(TRANSPOSED), (name, tensor.stride())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = tokens(2, 9)
    assert torch.equal(model.transformer.wte(idx), want["transformer.wte.weight"][idx])  # rows of the columns


@pytest.mark.parametrize("n", [1, 2, 3])
@torch.inference_mode()
def test_linear_is_f_linear_in_either_layout(n: int, threads) -> None:
    threads(n)
    gen = torch.Generator().manual_seed(0)
    for out, inp in ((96, 64), (64, 96), (64, 64), (97, 48)):
        weight = torch.randn(out, inp, generator=gen)
        bias = torch.randn(out, generator=gen)
        wide = torch.randn(inp, 2 * out + 3, generator=gen)[:, 3 : 3 + out].t()  # a slice, as VocabParallelHead
        wide.copy_(weight)
        for stored in (weight, weight.t().contiguous().t(), wide):
            for shape in ((1, 1, inp), (4, 1, inp), (2, 4, inp), (3, 3, inp), (1, 16, inp)):  # 1, 4, 8, 9, 16 rows
                x = torch.randn(shape, generator=gen)
                want = F.linear(x.double(), weight.double(), bias.double()).float()
                torch.testing.assert_close(layers.linear(x, stored, bias), want)
                torch.testing.assert_close(layers.linear(x, stored), want - bias)


# --- the same logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("config", [BIAS_CONFIG, NO_BIAS_CONFIG], ids=["bias", "no-bias"])
@torch.inference_mode()
def test_dense_and_simulated_decode_as_nanogpt(config: GPTConfig, n: int, nanogpt, threads, tmp_path: Path) -> None:
    threads(n)
    plain = random_weights(GPT(config), seed=3).eval()
    reference = nanogpt(model_args(config)).eval()
    reference.load_state_dict(plain.state_dict())
    torch.save({"model": plain.state_dict(), "model_args": model_args(config)}, tmp_path / "ckpt.pt")
    dense = load_checkpoint(tmp_path / "ckpt.pt")  # memory-mapped, as the CLI reads it
    split_checkpoint(dense, 2, tmp_path / "tp2")
    models = {"dense": dense_model(dense), "simulated tp 2": simulated_model(ShardSet.open(tmp_path / "tp2"))}
    idx = tokens(4, config.block_size, seed=5)
    for name, model in models.items():
        torch.testing.assert_close(model(idx), reference(idx), atol=ATOL, rtol=0, msg=name)
        for batch in (1, 4):  # 1 and 4 rows per step: the split kernel on 2 threads
            cache = KVCache(model, batch)
            model(idx[:batch, :5], cache)
            for t in range(5, 13):
                step = model(idx[:batch, t : t + 1], cache)[:, -1]
                full = reference(idx[:batch, : t + 1])[:, -1]
                torch.testing.assert_close(step, full, atol=ATOL, rtol=0, msg=f"{name}, step {t}")


@pytest.mark.slow  # 2 processes x 2 threads on 2 cores
def test_distributed_verifies_on_2_threads_per_rank(tmp_path: Path) -> None:
    """Two gloo ranks, 2 threads each (the split kernel in every rank), against the dense model."""
    plain = random_weights(GPT(BIAS_CONFIG), seed=4)
    torch.save({"model": plain.state_dict(), "model_args": model_args(BIAS_CONFIG)}, tmp_path / "ckpt.pt")
    split_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"), 2, tmp_path / "tp2")
    args = ["verify", tmp_path / "tp2", "--against", tmp_path / "ckpt.pt", "--mode", "distributed", "--threads", "2"]
    args += ["--batch", "2", "--random-tokens", "16", "--tokens", "8"]  # decode steps of 2 rows: split
    done = subprocess.run(
        [sys.executable, "-m", "tpshard", *map(str, args), "--json"], capture_output=True, text=True, timeout=120
    )
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["passed"], done.stderr
    assert report["numerics"]["logits_max_abs"] < ATOL and report["numerics"]["logits_outside"] == 0


# --- memory ---------------------------------------------------------------------------------------

BIG = GPTConfig(block_size=64, vocab_size=32768, n_layer=4, n_head=8, n_embd=512, bias=True)  # 118 MB of fp32

RSS_PROBE = textwrap.dedent(
    """
    import sys, torch
    from tpshard.comm.collectives import LOCAL
    from tpshard.files.paths import load_checkpoint
    from tpshard.files.shardset import ShardSet
    from tpshard.generation import generate
    from tpshard.runtime.models import dense_model, sharded_model

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    torch.set_num_threads(int(sys.argv[3]))
    def run(path):
        if path.endswith(".pt"):
            model = dense_model(load_checkpoint(path))
        else:  # rank 0 of a 2-way set, from its own file, as distributed_model reads it
            model = sharded_model(ShardSet.open(path), [0], LOCAL)
        prompt = torch.zeros(1, 8, dtype=torch.long)
        for _ in generate(model, prompt, 8, lambda logits: logits.argmax(-1)):
            pass
        return model
    run(sys.argv[2])  # a tiny model first: libraries paged in, allocator and thread pools warm
    before = status("VmRSS")
    model = run(sys.argv[1])
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    print(weights, status("VmHWM") - before)
    """
)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BIG and BIAS_CONFIG (tiny) checkpoints, each split 2 ways beside it."""
    folder = tmp_path_factory.mktemp("big")
    for name, config in (("big", BIG), ("tiny", BIAS_CONFIG)):
        ckpt = {"model": random_weights(GPT(config)).state_dict(), "model_args": model_args(config)}
        torch.save(ckpt, folder / f"{name}.pt")
        split_checkpoint(load_checkpoint(folder / f"{name}.pt"), 2, folder / f"{name}-tp2")
    return folder


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("source", ["dense", "rank 0 of tp 2"])
def test_a_process_holds_its_weights_once(source: str, n: int, big: Path) -> None:
    """Its peak RSS grows by at most 1.1x the weights it holds (measured: 1.00x), from the memory-mapped
    file (the ckpt.pt or its rank file). Without dropping the pages it copies, the peak would be 2x:
    the file's pages, read to transpose them, plus the copies."""
    paths = (big / "big.pt", big / "tiny.pt") if source == "dense" else (big / "big-tp2", big / "tiny-tp2")
    probe = [sys.executable, "-c", RSS_PROBE, *map(str, paths), str(n)]
    weights, grown = map(int, subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split())
    assert weights > 80e6
    assert grown <= 1.1 * weights, f"peak RSS grew by {grown / weights:.2f}x the weights"


def test_only_file_backed_pages_are_dropped(tmp_path: Path) -> None:
    """A page written since it was mapped holds data the file does not: it is never dropped."""
    if sys.platform != "linux":
        pytest.skip("pagemap and MADV_DONTNEED: Linux")
    data = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"t": data}, tmp_path / "t.pt")
    mapped = torch.load(tmp_path / "t.pt", mmap=True, weights_only=True)["t"]
    assert torch.equal(mapped, data)  # every page read: resident, from the file
    assert pages.drop_file_pages(mapped)
    assert torch.equal(mapped, data)  # read again from the file
    mapped[mmap.PAGESIZE] = -1.0  # one page copied on write: anonymous memory
    assert not pages.drop_file_pages(mapped)
    assert mapped[mmap.PAGESIZE] == -1.0
    assert not pages.drop_file_pages(data.clone())  # memory of its own


def test_a_tensors_neighbours_in_its_file_are_dropped_with_it(tmp_path: Path) -> None:
    """Reading a tensor maps the file's pages around it too (a fault maps a large folio whole): those
    of the tensor before it in the file, done with already, go with it, though outside its storage."""
    if sys.platform != "linux":
        pytest.skip("pagemap and MADV_DONTNEED: Linux")
    before, after = torch.randn(1 << 18), torch.randn(1 << 18)  # 1 MB each, one after the other in the file
    torch.save({"before": before, "after": after}, tmp_path / "t.pt")
    loaded = torch.load(tmp_path / "t.pt", mmap=True, weights_only=True)
    assert torch.equal(loaded["before"], before) and torch.equal(loaded["after"], after)  # both resident
    assert resident(loaded["before"]) > 0
    assert pages.drop_file_pages(loaded["after"])
    if pages._file_mapping(loaded["after"].data_ptr()) is None:
        pytest.skip("the kernel cannot say which mapping holds an address (PROCMAP_QUERY: Linux 6.11)")
    assert resident(loaded["before"]) == 0
    assert torch.equal(loaded["before"], before)  # read again from the file


def resident(tensor: torch.Tensor) -> int:
    """How many whole pages inside tensor's bytes are mapped in this process."""
    kinds = pages._page_kinds(*pages._inner_pages(tensor))
    assert kinds is not None
    return len(kinds) - kinds.count(b"-")


def test_a_files_mapping_is_the_kernels_own_now(tmp_path: Path) -> None:
    """The bounds of the mapping that holds an address are asked of the kernel each time, never kept: a
    file's mapping unmapped, its addresses belong to no file's."""
    if sys.platform != "linux":
        pytest.skip("/proc/self/maps: Linux")
    (tmp_path / "f").write_bytes(b"x" * (4 * mmap.PAGESIZE))
    with open(tmp_path / "f", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable: frombuffer takes it quietly
    start = torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()
    found = pages._file_mapping(start + 5)
    if found is None:
        pytest.skip("the kernel cannot say which mapping holds an address (PROCMAP_QUERY: Linux 6.11)")
    assert found == (start, start + 4 * mmap.PAGESIZE)
    assert pages._file_mapping(torch.ones(1 << 20).data_ptr()) is None  # anonymous memory
    mapped.close()
    assert pages._file_mapping(start + 5) is None


def test_proc_files_open_once_whichever_threads_ask_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads that all ask for /proc/self/pagemap first, at once, get one file, opened once."""
    if sys.platform != "linux":
        pytest.skip("/proc/self/pagemap: Linux")
    monkeypatch.setattr(pages, "_proc_fds", {})
    opened = []
    real_open = os.open

    def slow_open(*args: object, **kwargs: object) -> int:
        time.sleep(0.05)  # every thread inside the first use together
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", slow_open)
    start = threading.Barrier(8)
    got = []

    def ask() -> None:
        start.wait()
        got.append(pages._proc_self("pagemap"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 1 and got == opened * 8
    os.close(opened[0])
