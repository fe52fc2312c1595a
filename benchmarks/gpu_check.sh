#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command from the repository root (under 10 minutes; requirements installed):
#     bash benchmarks/gpu_check.sh        PYTHON=... picks the interpreter (python3), GPU_CHECK_LOGS=DIR the log folder
# tests/test_gpu.py: fp16 with its gradient scaler (and resuming), bf16, channels_last, torch.compile, pinned batches,
# a one-process torchrun (NCCL, DDP), test.py on those runs' checkpoints; then the template/plain-loop ratio on the GPU
# for ResNet-18 and the config's model (python -m benchmarks.benchmark). One line per check: PASS or FAIL, its name,
# its figure (seconds, the ratio) or why it failed; a test skipped on a GPU counts as failed. Exit code 0 when all
# passed, 1 when any failed, 2 without a GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
gpu=$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), "torch",
      torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null) \
    || { echo "error: $PYTHON sees no CUDA device (or cannot import torch): these checks need a GPU" >&2; exit 2; }
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$LOGS" && : >"$LOGS/summary.txt" || exit 2
say() { echo "$*" | tee -a "$LOGS/summary.txt"; }
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c1-200; }
export PYTHONUNBUFFERED=1
echo "gpu: $gpu; full output in $LOGS"

timeout -k 10 330 "$PYTHON" -m pytest -m cuda -p no:cacheprovider --junitxml="$LOGS/pytest.xml" tests/test_gpu.py \
    >"$LOGS/pytest.log" 2>&1
rc=$?
[ -s "$LOGS/pytest.xml" ] && "$PYTHON" - "$LOGS/pytest.xml" <<'PY' | tee -a "$LOGS/summary.txt"
import sys
import xml.etree.ElementTree as ET

for case in ET.parse(sys.argv[1]).iter("testcase"):
    bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
    why = f": {bad[0].tag}: {(bad[0].get('message') or '').strip()[:200]}" if bad else ""
    print(f"{'FAIL' if bad else 'PASS'} {case.get('name')} ({float(case.get('time') or 0):.1f} s){why}")
PY
if ! grep -q '^FAIL' "$LOGS/summary.txt" && { ((rc != 0)) || ! grep -q '^PASS' "$LOGS/summary.txt"; }; then
    say "FAIL pytest tests/test_gpu.py (exit code $rc): $(last_line "$LOGS/pytest.log")"
fi

for model in resnet18 config; do  # whole epochs: on a GPU a cut-short epoch is mostly its checkpoint
    timeout -k 10 150 "$PYTHON" -m benchmarks.benchmark --model $model --device cuda --pairs 2 --train-batches 0 \
        --val-batches 0 >"$LOGS/benchmark-$model.log" 2>&1
    rc=$?
    ratio=$(grep -m 1 'ratio template/plain' "$LOGS/benchmark-$model.log" | sed 's/^ *//')
    if ((rc == 0)) && [ -n "$ratio" ]; then
        say "PASS benchmark $model cuda: $ratio"
    else
        say "FAIL benchmark $model cuda (exit code $rc): $(last_line "$LOGS/benchmark-$model.log")"
    fi
done

failed=$(grep -c '^FAIL' "$LOGS/summary.txt")
echo "$(grep -c '^PASS' "$LOGS/summary.txt") passed, $failed failed"
((failed == 0))
