"""Memory and time of split, merge (each format), reshard and verify on a model bigger than a laptop's
spare RAM: a GPT-2-large-shaped nanoGPT checkpoint (36 layers, 20 heads, 1280 wide, vocab 50257, block
1024: 774M parameters, 3.1 GB fp32, random weights, no optimizer state).

    python benchmarks/bench_memory.py              build the checkpoint (once), measure, clean up
    python benchmarks/bench_memory.py --keep       keep the 3.1 GB checkpoint for the next run
    python benchmarks/bench_memory.py --quick      a 12-layer, 768-wide model: a smoke test
    python benchmarks/bench_memory.py --repeat 5   each command (and its floor) 5 times (default 3)

Every command runs as a process of its own, the way a user runs it. This process imports no torch and
watches each child from outside:

    peak anon   the largest RssAnon (/proc/PID/status) sampled every 5 ms: anonymous memory only, what
                tpshard allocates itself. Sampled, so a lower bound; the kernel keeps no high-water
                mark of it.
    peak RSS    the kernel's own high-water mark of the child's resident memory (ru_maxrss from wait4,
                VmHWM): anonymous and memory-mapped file pages together, exact, and an upper bound on
                the anonymous peak.
    written     the bytes of the command's output.
    cp + fsync  `cp -r` of that very output to a new name, then fsync of every file copied: the floor
                for writing those bytes on this disk, measured right after each run of the command.
    floor       `python -c "import torch"` + cp + fsync: the floor for any Python tool that writes them.

Each command runs --repeat times, its floor measured after each run; the table gives the medians of
wall, CPU and floor, "x floor" the median wall over the median floor, and "range" the least and most
of the runs' own wall / floor; the memory figures are the largest of the runs.

Every command's input is in the page cache when it starts, and so is the output when the floor's cp
reads it: each is read through once first (tpshard writes large outputs past the page cache, O_DIRECT).

Targets (issue 16): peak anon at most 0.25x the model's bytes for every command; wall time at most 1.5x
the floor (for verify, which writes nothing, the floor is import torch alone: its ratio is reported,
not held to the target). The machine may be shared and noisy: compare ratios, and run it twice before
believing one. Outputs are removed after each command; the checkpoint after the run unless --keep.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "gpt2-large"
SHAPES = {  # n_layer, n_head, n_embd, vocab_size, block_size
    "gpt2-large": (36, 20, 1280, 50257, 1024),
    "quick": (12, 12, 768, 50257, 1024),
}
ANON_TARGET, WALL_TARGET = 0.25, 1.5


# --- the checkpoint (built in a child process: this one stays free of torch) ------------------------------


def build(path: Path, shape: str) -> None:
    """nanoGPT's ckpt.pt layout, tensor by tensor from a seeded generator (random_weights' scales)."""
    import torch

    from tpshard.config import GPTConfig
    from tpshard.files.checkpoint import model_args
    from tpshard.parallel.plan import dense_shapes

    n_layer, n_head, n_embd, vocab_size, block_size = SHAPES[shape]
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, size in dense_shapes(config).items():
        std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
        gain = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
        state[name] = torch.randn(size, generator=gen) * std + gain
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, stored once, as nanoGPT saves it
    record = {"model": state, "optimizer": None, "model_args": model_args(config), "iter_num": 1}
    record |= {"best_val_loss": torch.tensor(3.0), "config": {"dataset": "openwebtext"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path.with_suffix(".partial"))
    os.replace(path.with_suffix(".partial"), path)


def model_bytes(shape: str) -> int:
    n_layer, _, C, V, T = SHAPES[shape]
    return 4 * (V * C + T * C + n_layer * (12 * C * C + 13 * C) + 2 * C)


# --- measuring ------------------------------------------------------------------------------------------


def status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f) if k == "RssAnon"}
    except (OSError, ValueError):
        return {}


def measure(command: list[str]) -> dict[str, float]:
    """wall and CPU seconds, peak anonymous memory (sampled) and peak RSS (the kernel's) of one run."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while child.returncode is None:
            peak[0] = max(peak[0], status(child.pid).get("RssAnon", 0))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, code, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(code)
    sampler.join()
    err = child.stderr.read().decode() if child.stderr else ""
    if child.returncode != 0:
        sys.exit(f"failed ({child.returncode}): {' '.join(command)}\n{err}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "anon": peak[0], "rss": usage.ru_maxrss * 1024}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def copy_floor(output: Path) -> float:
    """cp -r of output to a new name, then fsync of every file: seconds (the copy removed after)."""
    copy = output.with_name(output.name + ".copy")
    script = f'cp -r "{output}" "{copy}" && find "{copy}" -type f -exec sync {{}} +'
    wall = measure(["sh", "-c", script])["wall"]
    remove(copy)
    return wall


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- the run --------------------------------------------------------------------------------------------


def commands(ckpt: Path) -> list[tuple[str, list[str], list[Path], Path | None, Path | None]]:
    """(name, argv, inputs, output, an output to remove once measured) in run order: split first (the
    others read it)."""
    tpshard = [sys.executable, "-m", "tpshard"]
    shards, d = ckpt.parent / "shards", ckpt.parent
    check = ["--batch", "1", "--random-tokens", "16", "--tokens", "4"]
    merged = [(fmt, d / name) for fmt, name in (("pt", "merged.pt"), ("safetensors", "merged.safetensors"))]
    merged += [(fmt, d / fmt) for fmt in ("hf", "dcp")]
    return [
        ("split --tp 2", [*tpshard, "split", str(ckpt), "--tp", "2", "-o", str(shards)], [ckpt], shards, None),
        *(
            (f"merge ({fmt})", [*tpshard, "merge", str(shards), "-o", str(out), "--format", fmt], [shards], out, out)
            for fmt, out in merged
        ),
        (
            "reshard --tp 4",
            [*tpshard, "reshard", str(shards), "--tp", "4", "-o", str(d / "tp4")],
            [shards],
            d / "tp4",
            d / "tp4",
        ),
        (
            "verify --against",
            [*tpshard, "verify", str(shards), "--against", str(ckpt), *check],
            [shards, ckpt],
            None,
            None,
        ),
        ("verify (merged in memory)", [*tpshard, "verify", str(shards), *check], [shards], None, shards),
    ]


def warm(path: Path) -> None:
    """Read every file under path (or path itself) through once, into the page cache."""
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(16 << 20):
                    pass


Run = tuple[dict[str, float], int, float]  # a command's figures (measure), the bytes it wrote, its floor


def run(argv: list[str], inputs: list[Path], output: Path | None, torch_s: float) -> Run:
    """One run of a command, its inputs warm, and its floor: import torch, and cp + fsync of its output
    (read through once first, as the command's input was)."""
    for path in inputs:
        warm(path)
    if output is not None:
        remove(output)  # the run before's
    result = measure(argv)
    if output is None:
        return result, 0, torch_s
    warm(output)
    return result, size(output), torch_s + copy_floor(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint in benchmarks/out for the next run")
    parser.add_argument("--quick", action="store_true", help="a 12-layer, 768-wide model (a smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command and of its floor (default 3)")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: at least 1")
    shape = "quick" if args.quick else "gpt2-large"
    if args.build:
        return build(Path(args.build), shape)
    ckpt = OUT.with_name(shape) / "ckpt.pt"
    if not ckpt.is_file():
        print(f"building {ckpt} ...", flush=True)
        quick = ["--quick"] if args.quick else []
        subprocess.run([sys.executable, __file__, "--build", str(ckpt), *quick], check=True)
    dense = model_bytes(shape)
    torch_s = statistics.median(measure([sys.executable, "-c", "import torch"])["wall"] for _ in range(3))
    on_disk = ckpt.stat().st_size / 1e9
    print(f"{ckpt}: {on_disk:.2f} GB on disk, model {dense / 1e9:.2f} GB; import torch {torch_s:.2f} s")
    rows = []
    try:
        for name, argv, inputs, output, done in commands(ckpt):
            runs = [run(argv, inputs, output, torch_s) for _ in range(args.repeat)]
            rows.append((name, runs))
            walls = ", ".join(f"{result['wall']:.1f}" for result, _, _ in runs)
            print(f"  {name}: {walls} s", flush=True)
            if done is not None:
                remove(done)
    finally:
        for path in ("shards", "merged.pt", "merged.safetensors", "hf", "dcp", "tp4"):
            remove(ckpt.parent / path)
        if not args.keep:
            remove(ckpt)
    report(rows, dense)


def summary(runs: list[Run]) -> dict[str, float]:
    """The medians of wall, CPU and floor, the median wall over the median floor (ratio), the least and
    most of the runs' own wall / floor (low, high); the largest peaks of memory."""
    median = {key: statistics.median(r[key] for r, _, _ in runs) for key in ("wall", "cpu")}
    floor = statistics.median(f for _, _, f in runs)
    ratios = [r["wall"] / f for r, _, f in runs]
    peaks = {key: max(r[key] for r, _, _ in runs) for key in ("anon", "rss")}
    return {**median, **peaks, "floor": floor, "ratio": median["wall"] / floor, "low": min(ratios), "high": max(ratios)}


def report(rows: list[tuple[str, list[Run]]], dense: int) -> None:
    print(
        f"\n{'command':<27}{'wall s':>8}{'CPU s':>8}{'peak anon':>11}{'x model':>8}{'peak RSS':>10}{'x model':>8}"
        f"{'written':>9}{'floor s':>9}{'x floor':>8}{'range':>12}"
    )
    figures = [(name, summary(runs), runs[-1][1]) for name, runs in rows]
    for name, f, written in figures:
        print(
            f"{name:<27}{f['wall']:>8.1f}{f['cpu']:>8.1f}{f['anon'] / 1e6:>8.0f} MB{f['anon'] / dense:>8.3f}"
            f"{f['rss'] / 1e6:>7.0f} MB{f['rss'] / dense:>8.3f}{written / 1e9:>6.2f} GB{f['floor']:>9.1f}"
            f"{f['ratio']:>8.2f}{f['low']:>7.2f}-{f['high']:.2f}"
        )
    runs = len(rows[0][1]) if rows else 0
    print(f"\n(medians of {runs} runs each; memory: the largest of them; range: the runs' own wall / floor)")
    anon_ok = all(f["anon"] <= ANON_TARGET * dense for _, f, _ in figures)
    writers = [f["ratio"] for _, f, written in figures if written]
    print(f"peak anon <= {ANON_TARGET}x the model for every command: {'met' if anon_ok else 'MISSED'}")
    print(
        f"wall <= {WALL_TARGET}x (import torch + cp + fsync of the bytes written), the writers' medians: "
        f"{'met' if all(w <= WALL_TARGET for w in writers) else 'MISSED'} (worst {max(writers):.2f}x)"
    )
    print(f"(machine load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
