#!/usr/bin/env bash
# One accelerator check, under 8 minutes on one GPU; also runs on a CPU.
#
# Runs, each under its own time limit, printing one RESULT line per figure:
#   1. the tests that touch distribution and precision (mirrored / multi-
#      worker training, EMA under MirroredStrategy, mixed precision, XLA);
#   2. bench/train_step.py with --precision=mixed_float16, without and with
#      --jit_compile (GPU only: on a CPU XLA is several times slower and
#      float16 has no fast kernels, so the figures would mean nothing);
#   3. bench/predict.py;
#   4. the digits pipeline (flags/digits.cfg) with --strategy=mirrored over
#      every GPU (GPU only: MirroredStrategy over logical CPUs is a test of
#      the code path, about 20x slower than the default strategy).
# On a machine without a GPU, parts 2 and 4 print "SKIP ..." and say why.
#
#   bench/device_check.sh [--out=DIR]      (DIR keeps the logs; default: a
#                                           temporary folder)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=""
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#--out=}" ;;
    *) echo "Expected --out=DIR. Received: $arg" >&2; exit 2 ;;
  esac
done
out="${out:-$(mktemp -d -t ns-device-check-XXXX)}"
mkdir -p "$out"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
status=0

gpus=$(python -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' 2>/dev/null || echo 0)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "RESULT device_check gpus=${gpus} device=\"${device:-cpu}\" date=$(date -u +%F)"

# part NAME SECONDS COMMAND...: runs it with a limit, keeps its log, prints
# its last RESULT line (or a FAIL line).
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    local result
    result=$(grep '^RESULT' "$out/$name.log" | tail -1)
    echo "${result:-RESULT $name ok} seconds=$((SECONDS - start))"
  else
    echo "RESULT $name FAIL rc=$? seconds=$((SECONDS - start)) log=$out/$name.log"
    tail -5 "$out/$name.log" | sed 's/^/  /'
    status=1
  fi
}

part tests 240 python -m pytest -q -p no:warnings \
  tests/training/test_loop.py tests/training/test_optimizers.py tests/model/test_efficientnet.py \
  tests/data/test_streams.py \
  -k "mirrored or multi_worker or precision or jit or replica"

if [ "$gpus" -gt 0 ]; then
  part train_step_mixed 150 python bench/train_step.py --precision=mixed_float16
  part train_step_mixed_xla 150 python bench/train_step.py --precision=mixed_float16 --jit_compile
else
  echo "SKIP train_step_mixed, train_step_mixed_xla: no GPU (float16 and XLA are slower than float32 on this CPU)"
fi

part predict 200 python bench/predict.py

if [ "$gpus" -gt 0 ]; then
  part digits_mirrored 240 python -m noisy_student.cli.pipeline \
    --flagfile=flags/digits.cfg --workdir="$out/digits" --strategy=mirrored
  python - "$out/digits/report.json" <<'PY' || status=1
import json, sys
iterations = json.load(open(sys.argv[1]))["iterations"]
print("RESULT digits_mirrored " + " ".join(
    f"{r['role']}{r['iteration']}_top1={r['test_top1']:.4f}"
    for r in iterations))
PY
else
  echo "SKIP digits_mirrored: no GPU (MirroredStrategy over CPUs is ~20x slower; the tests above cover its code path)"
fi
echo "logs: $out"
exit $status
