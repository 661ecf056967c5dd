"""scripts/cuda_check.sh, the CUDA checks in one command, on a machine without CUDA: one line saying it
skips, exit code 0, nothing left behind (it runs the real checks where there is a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_check.sh"


def test_without_cuda_it_skips_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done
    assert done.stdout.startswith("cuda_check: SKIP: no CUDA device visible to torch"), done.stdout
    assert done.stdout.count("\n") == 1 and done.stderr == ""
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone
