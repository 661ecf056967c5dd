#!/usr/bin/env bash
# Every CUDA-specific check of tpshard, in one command, on a machine with one GPU (or more: the
# refusal check sees only the first), in a few minutes:
#
#     scripts/cuda_check.sh            (TPSHARD=..., PYTHON=... to run another install)
#
# 1-6  generate on --device cuda: dense and simulated tp 2, in float32, bfloat16 and float16
# 7    verify on cuda: dense against simulated tp 2 logits within verify's default tolerance for each
#      dtype, and the float32 cuda logits against the float32 CPU ones (tpshard verify has no
#      --device: this runs its comparison through the library)
# 8    a one-rank NCCL group: split --tp 1, generate --mode distributed --nproc 1 --device cuda
# 9    the test that is skipped without CUDA: a checkpoint saved from the GPU loads to the CPU
# 10   two ranks on one GPU: refused with one line and a non-zero exit code
#
# One summary line per check, PASS or FAIL with its figures; the exit code is the number of
# failures (0: all passed). Without a CUDA device it says so and exits 0. Everything it writes goes
# to a temporary directory of its own, removed at the end; it installs and exports nothing.

set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ -n "${TPSHARD:-}" ]; then read -r -a CLI <<< "$TPSHARD"; elif command -v tpshard > /dev/null; then CLI=(tpshard); else CLI=("$PY" -m tpshard); fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tpshard-cuda-check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
    about=$("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")' 2> /dev/null)
    echo "cuda_check: SKIP: no CUDA device visible to torch (${about:-torch not importable}); nothing was run"
    exit 0
fi

CHAR="$ROOT/sample_checkpoints/shakespeare_char/ckpt.pt"
START=$(date +%s)
FAILED=0
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"cuda_check: {torch.cuda.device_count()} GPU(s), cuda:0 {p.name}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

report() {  # report NAME OK FIGURES [LOG]: one summary line; on failure, the last lines of LOG
    local name=$1 ok=$2 figures=$3 log=${4:-}
    if [ "$ok" = 1 ]; then
        printf 'PASS  %-44s %s\n' "$name" "$figures"
    else
        printf 'FAIL  %-44s %s\n' "$name" "$figures"
        FAILED=$((FAILED + 1))
        if [ -n "$log" ] && [ -s "$log" ]; then tail -n 5 "$log" | sed 's/^/      | /'; fi
    fi
}

tokens_per_s() {  # the "N tokens in X s: Y tokens/s" line tpshard generate prints on stderr
    grep -o '[0-9.]* tokens/s' "$1" | tail -n 1
}

generate() {  # generate NAME SOURCE ARGS...: greedy text on cuda, its tokens/s
    local name=$1 source=$2 tag=${1//[^a-z0-9]/_}
    shift 2
    "${CLI[@]}" generate "$source" --device cuda --greedy --max-new-tokens 200 --prompt "ROMEO:" "$@" \
        > "$WORK/$tag.out" 2> "$WORK/$tag.err"
    local code=$? speed
    speed=$(tokens_per_s "$WORK/$tag.err")
    if [ $code = 0 ] && [ -n "$speed" ] && [ -s "$WORK/$tag.out" ] && grep -q "on cuda" "$WORK/$tag.err"; then
        report "$name" 1 "$speed, $(wc -c < "$WORK/$tag.out") bytes of text"
    else
        report "$name" 0 "exit code $code" "$WORK/$tag.err"
    fi
}

# --- the shard sets -----------------------------------------------------------------------------
if ! "${CLI[@]}" split "$CHAR" --tp 2 -o "$WORK/tp2" > "$WORK/split.log" 2>&1 \
    || ! "${CLI[@]}" split "$CHAR" --tp 1 -o "$WORK/tp1" >> "$WORK/split.log" 2>&1; then
    report "split the char sample (--tp 2, --tp 1)" 0 "cannot continue" "$WORK/split.log"
    exit "$FAILED"
fi

# --- 1-6: generate --------------------------------------------------------------------------------
for dtype in float32 bfloat16 float16; do
    generate "generate dense $dtype" "$CHAR" --dtype "$dtype"
    generate "generate simulated tp 2 $dtype" "$WORK/tp2" --dtype "$dtype"
done
dense_text=$WORK/generate_dense_float32.out simulated_text=$WORK/generate_simulated_tp_2_float32.out
if [ -s "$dense_text" ] && [ -s "$simulated_text" ]; then
    if cmp -s "$dense_text" "$simulated_text"; then
        echo "      (float32: dense and simulated printed the same text)"
    else
        echo "      (float32: dense and simulated texts differ: a near tie between two tokens?)"
    fi
fi

# --- 7: verify's comparison on cuda ------------------------------------------------------------------
"$PY" - "$CHAR" "$WORK/tp2" > "$WORK/verify.out" 2> "$WORK/verify.err" << 'EOF'
import sys

import torch

from tpshard.files.paths import load_checkpoint
from tpshard.files.shardset import ShardSet
from tpshard.runtime.models import dense_model, simulated_model
from tpshard.verify.run import DEFAULT_TOLERANCES

torch.set_grad_enabled(False)
ckpt, shards = load_checkpoint(sys.argv[1]), ShardSet.open(sys.argv[2])
idx = torch.randint(ckpt.config.vocab_size, (4, ckpt.config.block_size), generator=torch.Generator().manual_seed(0))
cpu = dense_model(ckpt)(idx)
for dtype, (atol, rtol) in DEFAULT_TOLERANCES.items():
    if dtype is torch.float64:
        continue
    dense = dense_model(ckpt, device="cuda", dtype=dtype)(idx.cuda()).float()
    sharded = simulated_model(shards, device="cuda", dtype=dtype)(idx.cuda()).float()
    diff = (sharded - dense).abs()
    outside = int((diff > atol + rtol * dense.abs()).sum())
    name = str(dtype).removeprefix("torch.")
    line = f"{name}: max abs diff {diff.max().item():.2e}, {outside} of {diff.numel()} outside atol {atol} + rtol {rtol}"
    if dtype is torch.float32:
        to_cpu = (dense.cpu() - cpu).abs()
        outside += int((to_cpu > atol + rtol * cpu.abs()).sum())
        line += f"; cuda vs cpu {to_cpu.max().item():.2e}"
    print(line, flush=True)
    if outside:
        sys.exit(1)
EOF
code=$?
figures=$(paste -sd ';' "$WORK/verify.out" | sed 's/;/; /g')
if [ $code = 0 ] && [ "$(wc -l < "$WORK/verify.out")" = 3 ]; then
    report "verify: dense vs simulated tp 2 on cuda" 1 "$figures"
else
    report "verify: dense vs simulated tp 2 on cuda" 0 "exit code $code${figures:+ ($figures)}" "$WORK/verify.err"
fi

# --- 8: one NCCL rank --------------------------------------------------------------------------------
generate "distributed, one NCCL rank (tp 1)" "$WORK/tp1" --mode distributed --nproc 1 --stats

# --- 9: the CUDA-only test ------------------------------------------------------------------------
(cd "$WORK" && PYTHONDONTWRITEBYTECODE=1 "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
    "$ROOT/tests/test_checkpoint.py::test_cuda_saved_checkpoint_loads_to_cpu") > "$WORK/pytest.log" 2>&1
code=$?
summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$WORK/pytest.log" | tail -n 1)
if [ $code = 0 ] && [[ $summary == *"1 passed"* ]]; then
    report "test_cuda_saved_checkpoint_loads_to_cpu" 1 "$summary"
else
    report "test_cuda_saved_checkpoint_loads_to_cpu" 0 "exit code $code: ${summary:-no summary}" "$WORK/pytest.log"
fi

# --- 10: two ranks, one GPU -------------------------------------------------------------------------
first=${CUDA_VISIBLE_DEVICES:-0}
CUDA_VISIBLE_DEVICES=${first%%,*} "${CLI[@]}" generate "$WORK/tp2" --mode distributed --device cuda \
    --max-new-tokens 5 > "$WORK/two.out" 2> "$WORK/two.err"
code=$?
lines=$(grep -c . "$WORK/two.err")
if [ $code != 0 ] && [ "$lines" = 1 ] && grep -qi "cuda" "$WORK/two.err" && ! grep -q Traceback "$WORK/two.err"; then
    report "two ranks on one GPU: refused" 1 "exit code $code: $(cat "$WORK/two.err")"
else
    report "two ranks on one GPU: refused" 0 "exit code $code, $lines lines on stderr" "$WORK/two.err"
fi

echo "cuda_check: $((10 - FAILED)) of 10 checks passed in $(($(date +%s) - START)) s"
exit "$FAILED"
