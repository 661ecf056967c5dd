"""Split and merge speed and memory on a GPT-2-124M-shaped nanoGPT checkpoint with its AdamW state.

    python benchmarks/bench_split.py              measure (builds the checkpoint first if needed)
    python benchmarks/bench_split.py --runs 5     more measured runs per command (default 3)

The checkpoint (12 layers, 12 heads, 768 wide, vocab 50304: ~500 MB of weights plus ~1 GB of AdamW
moments after one real step, as nanoGPT's train.py saves it) is built once and cached in
benchmarks/out/ (gitignored), with a file of exactly the model's bytes for the copy baseline.

Every command runs as a process of its own; its wall time is measured here, its CPU time (user + sys)
and peak RSS are what wait4 reports for that one child (ru_maxrss: the largest of it and the processes
it waited for; CPU time is the steadier number on a busy machine).
This process imports no torch, so no child inherits a large parent's RSS. Each command runs once to
warm the page cache (not reported), then --runs times; the table shows the median.

    cp checkpoint            cp of the whole ckpt.pt (model + optimizer)
    import torch + cp model  `python -c "import torch"` then cp of a file of the model's bytes:
                             the floor for any Python tool that writes the model once
    tpshard split --tp 2     the real command: validate, split, hash source and output, fsync
    tpshard merge            back to a ckpt.pt, every rank file's sha256 checked first
    naive split --tp 2       torch.load everything (optimizer too), chunk, torch.save per rank

Targets: split wall time at most 1.3x (import torch + cp model); split peak RSS at most half the naive
split's. The machine may be shared: run it twice before believing a ratio.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CKPT = OUT / "gpt2-124m" / "ckpt.pt"
MODEL_BYTES = OUT / "gpt2-124m" / "model.bin"
TP = 2


# --- building the checkpoint (in a child process: this one stays small) -------------------------------


def build() -> None:
    import torch
    from torch.nn import functional as F

    from tpshard.config import GPTConfig
    from tpshard.files.checkpoint import model_args
    from tpshard.model import GPT
    from tpshard.parallel.plan import TIED
    from tpshard.testing import random_weights

    config = GPTConfig()
    torch.manual_seed(0)
    model = random_weights(GPT(config))
    params = dict(model.named_parameters())  # nanoGPT's configure_optimizers: decay on matrices only
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))
    x, y = torch.randint(config.vocab_size, (2, 1, 64))
    F.cross_entropy(model(x).view(-1, config.vocab_size), y.view(-1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": model_args(config),
        "iter_num": 1,
        "best_val_loss": torch.tensor(10.9),
        "config": {"dataset": "openwebtext", "batch_size": 12, "block_size": 1024, "learning_rate": 6e-4},
    }
    CKPT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, CKPT.with_suffix(".partial"))
    os.replace(CKPT.with_suffix(".partial"), CKPT)
    with open(MODEL_BYTES, "wb") as f:  # the stored tensors, the tied lm_head once, as split reads them
        for name, tensor in model.state_dict().items():
            if name not in TIED:
                f.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())


def naive_split(ckpt: Path, out: Path) -> None:
    """What a first attempt does: load everything, cut, save each rank with torch.save."""
    import torch

    from tpshard.parallel import plan

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(TP):
        pieces = {}
        for name, tensor in raw["model"].items():
            dim = plan.rule_for(name).dim
            pieces[name] = tensor if dim is None else tensor.chunk(TP, dim=dim)[rank].clone()
        torch.save({"model": pieces, "model_args": raw["model_args"]}, out / f"rank{rank}.pt")


# --- measuring ----------------------------------------------------------------------------------------


def measure(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one run of command as a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"failed ({child.returncode}): {' '.join(command)}\n{child.stderr.read().decode()}")
    child.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # KiB on Linux


def commands() -> dict[str, tuple[list[str], Path]]:
    """name -> (command, the output it writes: removed before each run)."""
    python = sys.executable
    tpshard = [shutil.which("tpshard") or python, *([] if shutil.which("tpshard") else ["-m", "tpshard"])]
    return {
        "cp checkpoint": (["cp", str(CKPT), str(OUT / "copy.pt")], OUT / "copy.pt"),
        "import torch + cp model": (
            ["sh", "-c", f'"{python}" -c "import torch" && cp "{MODEL_BYTES}" "{OUT / "copy.bin"}"'],
            OUT / "copy.bin",
        ),
        f"tpshard split --tp {TP}": (
            [*tpshard, "split", str(CKPT), "--tp", str(TP), "-o", str(OUT / "shards")],
            OUT / "shards",
        ),
        "tpshard merge": ([*tpshard, "merge", str(OUT / "shards"), "-o", str(OUT / "merged.pt")], OUT / "merged.pt"),
        f"naive split --tp {TP}": ([python, __file__, "--naive"], OUT / "naive"),
    }


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measured runs per command, after one warm-up")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build()
    if args.naive:
        return naive_split(CKPT, OUT / "naive")
    if not CKPT.is_file() or not MODEL_BYTES.is_file():
        print(f"building {CKPT} (once) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--build"], check=True)
    print(f"{CKPT}: {CKPT.stat().st_size / 1e9:.2f} GB, model bytes {MODEL_BYTES.stat().st_size / 1e6:.0f} MB")
    cmds = commands()
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cmds}
    # the split's output is the merge's input: keep the order, remove each output just before its run
    for run in range(args.runs + 1):
        for name, (command, output) in cmds.items():
            remove(output)
            measured = measure(command)
            if run:  # run 0 warms the page cache
                results[name].append(measured)
    report(results, {name: size(output) for name, (_, output) in cmds.items()})
    for _, output in cmds.values():  # ~3 GB of outputs; the checkpoint stays cached
        remove(output)


def report(results: dict[str, list[tuple[float, float, int]]], written: dict[str, int]) -> None:
    wall = {name: statistics.median(w for w, _, _ in runs) for name, runs in results.items()}
    rss = {name: max(r for _, _, r in runs) for name, runs in results.items()}
    header = f"{'command':<26}{'wall s (median)':>16}{'min':>8}{'max':>8}{'CPU s':>8}{'peak RSS':>12}{'written':>12}"
    print(f"\n{header}")
    for name, runs in results.items():
        walls = [w for w, _, _ in runs]
        cpu = statistics.median(c for _, c, _ in runs)
        print(
            f"{name:<26}{wall[name]:>16.2f}{min(walls):>8.2f}{max(walls):>8.2f}{cpu:>8.2f}"
            f"{rss[name] / 1e6:>9.0f} MB{written[name] / 1e6:>9.0f} MB"
        )
    split, naive, floor = f"tpshard split --tp {TP}", f"naive split --tp {TP}", "import torch + cp model"
    fastest = {name: min(w for w, _, _ in runs) for name, runs in results.items()}
    time_ratio, best_ratio = wall[split] / wall[floor], fastest[split] / fastest[floor]
    rss_ratio = rss[split] / rss[naive]
    print(
        f"\nsplit wall / (import torch + cp model): {time_ratio:.2f}x median, {best_ratio:.2f}x fastest runs "
        f"(target <= 1.3x: {_met(time_ratio <= 1.3)})"
    )
    print(f"split peak RSS / naive split's:          {rss_ratio:.2f}x (target <= 0.5x: {_met(rss_ratio <= 0.5)})")
    print(f"(machine load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
