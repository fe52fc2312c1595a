#!/usr/bin/env bash
# The project's checks that need a CUDA GPU, in one command from the repository root (under 10 minutes in all):
#
#     bash benchmarks/gpu_check.sh
#
# It runs the CUDA tests (tests/test_gpu.py), short train.py runs of the shipped config.json with fp16, bf16,
# channels_last and torch.compile, a one-process torchrun, test.py on each of those runs, and the ResNet-18
# throughput ratio of the template against a plain loop (python -m benchmarks.benchmark). One line per check:
# `PASS <name> (<s> s)` or `FAIL <name> (<s> s): <last line of its output>`, then `N passed, M failed`; the exit code
# is 0 only when every check passed. Without a CUDA device it stops at once with one line and exit code 2.
#
# Each check runs under its own timeout, and no check starts past the overall budget, so the whole stays within it.
# Every check's full output is kept in a log folder (printed at the start). Where $OUT is set, the console lines and
# all the logs (one file, each log under its own header) are also written there as the checks finish, with the
# benchmark's figures: gpu_check.txt, gpu_check_logs.txt, benchmark-resnet18.json.
#
# Environment:
#   PYTHON=...             the interpreter with torch (default: python3)
#   GPU_CHECK_INSTALL=1    first pip install -q -r requirements.txt (needs a network)
#   GPU_CHECK_BUDGET_S=N   seconds for everything (default 540: under the 10 minutes, with room to spare)
#   OUT=DIR                also write the console lines and logs here (see above)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
GRACE_S=10  # after a check's timeout: SIGTERM, then SIGKILL this much later
MIN_S=20    # a check with less time left than this is not started
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
LOGS=$WORK/logs
RUNS=$WORK/runs
mkdir -p "$LOGS" "$RUNS"
PASSED=0
FAILED=0

say() {  # a console line, also appended to $OUT/gpu_check.txt
    echo "$*"
    if [ -n "${OUT:-}" ]; then echo "$*" >>"$OUT/gpu_check.txt"; fi
}

last_line() {
    grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c1-300
}

# check NAME SECONDS VERIFY COMMAND...: run COMMAND with its output in $LOGS/NAME.log under a timeout of SECONDS (less
# when the overall budget has less left); when it succeeds, run VERIFY (a function, or - for none) with its output in
# the same log. Prints one PASS or FAIL line.
check() {
    local name=$1 budget=$2 verify=$3
    shift 3
    local log=$LOGS/$name.log start=$SECONDS rc=0 left=$((DEADLINE - SECONDS - GRACE_S)) reason=""
    if ((left < MIN_S)); then
        echo "not run: ${left} s left of the ${BUDGET_S} s budget" >"$log"
        rc=1
    else
        ((budget > left)) && budget=$left
        echo "\$ $* (timeout ${budget} s)" >"$log"
        timeout --kill-after="$GRACE_S" "$budget" "$@" >>"$log" 2>&1 || rc=$?
        if ((rc == 124 || rc == 137)); then
            reason="timed out after ${budget} s; last output: $(last_line "$log")"
        elif ((rc != 0)); then
            reason=$(last_line "$log")
            echo "exit code $rc" >>"$log"
        elif [ "$verify" != - ]; then
            echo "--- verify: $verify" >>"$log"
            timeout --kill-after="$GRACE_S" 60 bash -c "$verify" >>"$log" 2>&1 || rc=$?
            ((rc != 0)) && reason=$(last_line "$log")
        fi
    fi
    if [ -n "${OUT:-}" ]; then
        { echo "===== $name (exit code $rc, $((SECONDS - start)) s)"; cat "$log"; echo; } >>"$OUT/gpu_check_logs.txt"
    fi
    if ((rc == 0)); then
        PASSED=$((PASSED + 1))
        say "PASS $name ($((SECONDS - start)) s)"
    else
        FAILED=$((FAILED + 1))
        say "FAIL $name ($((SECONDS - start)) s): ${reason:-$(last_line "$log")}"
    fi
    return "$rc"
}

# --- the GPU ----------------------------------------------------------------------------------------------------------

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && : >"$OUT/gpu_check.txt" && : >"$OUT/gpu_check_logs.txt" || exit 2
fi
if [ "${GPU_CHECK_INSTALL:-0}" = 1 ]; then
    say "logs: $LOGS${OUT:+ (and $OUT)}"
    check install 240 - "$PYTHON" -m pip install -q -r requirements.txt
fi
stop() {  # stop LINE: no checks can run here; one line, the (empty) work folder removed, exit code 2
    echo "$1" >&2
    if [ -n "${OUT:-}" ]; then echo "$1" >>"$OUT/gpu_check.txt"; fi
    if [ "${GPU_CHECK_INSTALL:-0}" != 1 ]; then rm -rf "$WORK"; fi
    exit 2
}
command -v "$PYTHON" >/dev/null || stop "error: no $PYTHON here: set PYTHON to the interpreter that has torch"
GPU=$(timeout 120 "$PYTHON" - 2>&1 <<'PY'
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"error: cannot import torch ({type(e).__name__}: {e}); GPU_CHECK_INSTALL=1 installs the requirements")
if not torch.cuda.is_available():
    sys.exit(f"error: no CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees none; "
             "these checks need a GPU")
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
      f"{p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}; torch {torch.__version__}, CUDA "
      f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
)
status=$?
GPU=$(printf '%s\n' "$GPU" | grep -v '^[[:space:]]*$' | tail -n 1)  # the last line: warnings may come first
((status == 0)) || stop "${GPU:-error: $PYTHON could not start torch (exit code $status)}"
say "gpu: $GPU"
if command -v nvidia-smi >/dev/null; then
    say "nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 1)"
    nvidia-smi >"$LOGS/nvidia-smi.log" 2>&1
fi
compiler=$(command -v cc gcc clang 2>/dev/null | head -n 1)
say "C compiler (torch.compile's Triton kernels need one): ${compiler:-none found}"
if [ "${GPU_CHECK_INSTALL:-0}" != 1 ]; then say "logs: $LOGS${OUT:+ (and $OUT)}"; fi

# --- checks -----------------------------------------------------------------------------------------------------------

TRAIN=(-c config.json -d cuda -o trainer.epochs=1 -o trainer.limit_train_batches=20
       -o "data_loader.args.cache_dir=$RUNS/cache")

# the run folder under $RUNS/<check name>: the folder holding history.csv
run_folder() {
    find "$RUNS/$1" -name history.csv -printf '%h\n' 2>/dev/null | head -n 1
}

# what a finished train.py run left: history, train.log, the checkpoint (weights, scaler, layout, key names)
verify_run() {
    local name=${CHECK#train-} epochs=${EPOCHS:-1}
    local folder
    folder=$(run_folder "$CHECK")
    [ -n "$folder" ] || { echo "error: no run folder (history.csv) under $RUNS/$CHECK"; return 1; }
    "$PYTHON" - "$folder" "$name" "$epochs" <<'PY'
import csv, math, sys
from pathlib import Path

import torch

run, variant, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])


def fail(message):
    sys.exit(f"error: {run.name}: {message}")


with open(run / "history.csv", newline="") as f:
    rows = list(csv.DictReader(f))
if [r["epoch"] for r in rows] != [str(e) for e in range(1, epochs + 1)]:
    fail(f"history.csv has epochs {[r['epoch'] for r in rows]}, expected 1..{epochs}")
if not all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "val_loss")):
    fail("a loss in history.csv is not finite")
log = (run / "train.log").read_text()
if "training on cuda" not in log:
    fail("train.log does not say it trained on cuda")
checkpoint = torch.load(run / "checkpoint-last.pth", map_location="cpu", weights_only=True)
state = checkpoint["state_dict"]
if any(k.startswith("module.") or "_orig_mod." in k for k in state):
    fail("the checkpoint's keys carry module./_orig_mod. prefixes")
bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
if bad:
    fail(f"non-finite weights: {', '.join(bad[:3])}")
scale = (checkpoint.get("scaler") or {}).get("scale")
if variant == "fp16" and (not (scale and math.isfinite(scale) and scale > 0) or "needs a CUDA device" in log):
    fail(f"fp16: no usable gradient-scaler state in the checkpoint (scale {scale})")
if variant == "bf16" and checkpoint.get("scaler"):
    fail("bf16: a gradient-scaler state was saved")
if variant == "channels_last":
    convs = [k for k, v in state.items() if v.dim() == 4 and v.shape[1] > 1]
    flat = [k for k in convs
            if not state[k].is_contiguous(memory_format=torch.channels_last) or state[k].is_contiguous()]
    if not convs or flat:
        fail(f"channels_last: conv weights not saved channels_last: {flat or 'none found'}")
if variant == "compile" and "OptimizedModule" not in log:
    fail("compile: train.log shows no torch.compile wrapper")
if variant == "torchrun" and "x 1 process(es)" not in log:
    fail("torchrun: train.log does not say 1 process")
last = rows[-1]
print(f"ok: {len(rows)} epoch(s) on cuda, loss {float(last['loss']):.4f}, val_accuracy "
      f"{float(last.get('val_accuracy', 'nan')):.4f}, scaler scale {scale}")
PY
}

# test.py's output folder: predictions.csv with one row per test id, and metrics.json
verify_test() {
    local folder out
    folder=$(run_folder "${CHECK/test-/train-}")
    out=$(find "$folder" -maxdepth 1 -type d -name 'test-*' | head -n 1)
    [ -n "$out" ] || { echo "error: test.py wrote no test-* folder in $folder"; return 1; }
    "$PYTHON" - "$out" <<'PY'
import csv, json, math, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("predictions.csv", "metrics.json"):
    if not (out / name).is_file():
        sys.exit(f"error: no {name} in {out}")
with open(out / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
metrics = json.loads((out / "metrics.json").read_text())
if not rows or len(rows) != metrics["n_samples"] or not math.isfinite(metrics["loss"]):
    sys.exit(f"error: {len(rows)} predictions for {metrics['n_samples']} samples, loss {metrics['loss']}")
print(f"ok: {len(rows)} predictions, test loss {metrics['loss']:.4f}, "
      f"accuracy {metrics.get('accuracy', float('nan')):.4f}")
PY
}

# pytest passed: and skipped nothing, on a machine with a GPU
verify_pytest() {
    local summary
    summary=$(grep -E '[0-9]+ (passed|skipped|failed)' "$LOGS/pytest-cuda.log" | tail -n 1)
    case $summary in
        *skipped*) echo "error: CUDA tests were skipped on a machine with a GPU: $summary"; return 1 ;;
        *passed*) echo "ok: $summary" ;;
        *) echo "error: no pytest summary line"; return 1 ;;
    esac
}

# check runs VERIFY in a fresh bash (under a timeout): it needs these
export -f run_folder verify_run verify_test verify_pytest
export PYTHON RUNS LOGS CHECK EPOCHS

train_check() {  # train_check NAME SECONDS OVERRIDE...
    local name=$1 budget=$2
    shift 2
    CHECK=train-$name EPOCHS=1
    check "train-$name" "$budget" verify_run \
        "$PYTHON" train.py "${TRAIN[@]}" -o "trainer.save_dir=$RUNS/train-$name" "$@"
}

test_check() {  # test_check NAME: test.py -r <the run folder of train-NAME> -d cuda
    local folder
    CHECK=test-$1
    folder=$(run_folder "train-$1")
    if [ -z "$folder" ]; then
        check "test-$1" 10 - sh -c "echo 'no run folder: train-$1 did not finish'; exit 1"
    else
        check "test-$1" 45 verify_test "$PYTHON" test.py -r "$folder" -d cuda
    fi
}

check pytest-cuda 200 verify_pytest "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_gpu.py

train_check fp16 75 -o trainer.amp=fp16
train_check bf16 75 -o trainer.amp=bf16
train_check channels_last 75 -o trainer.channels_last=true
train_check compile 150 -o trainer.compile=true

CHECK=train-torchrun EPOCHS=2
check train-torchrun 90 verify_run \
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 train.py -c config.json -d cuda \
    -o trainer.epochs=2 -o trainer.limit_train_batches=10 -o "data_loader.args.cache_dir=$RUNS/cache" \
    -o "trainer.save_dir=$RUNS/train-torchrun"

for name in fp16 bf16 channels_last compile torchrun; do
    test_check "$name"
done

BENCH_JSON=$LOGS/benchmark-resnet18.json
if check benchmark-resnet18 150 - "$PYTHON" -m benchmarks.benchmark --model resnet18 --device cuda --pairs 2 \
        --skip startup loader --json "$BENCH_JSON"; then
    say "benchmark-resnet18 (cuda):$(grep -m 1 'ratio template/plain' "$LOGS/benchmark-resnet18.log" | sed 's/^ *//; s/^/ /')"
    if [ -n "${OUT:-}" ]; then cp "$BENCH_JSON" "$OUT/"; fi
fi

say "$PASSED passed, $FAILED failed"
((FAILED == 0))
