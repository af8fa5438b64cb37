#!/usr/bin/env bash
# GPU checks in one run (< 10 minutes on one NVIDIA GPU): the single-GPU path against the CPU
# reference (fp32, TF32 off), KV-cached decoding on the GPU, and bf16 tokens/s + MFU of a ~1B-param
# config. Lines starting PASS/FAIL/RESULT are the outcome; the exit code is non-zero on any FAIL.
# Usage: benchmarks/gpu_check.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export PYTHONWARNINGS="ignore::UserWarning" MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== 1/3 CPU reference (CUDA hidden)"
CUDA_VISIBLE_DEVICES= timeout 180 "$PY" benchmarks/gpu_check.py reference "$OUT"
echo "== 2/3 GPU against the CPU reference"
status=0
timeout 180 "$PY" benchmarks/gpu_check.py compare "$OUT" || status=$?
echo "== 3/3 bf16 throughput, ~1B params"
timeout 300 "$PY" benchmarks/gpu_check.py throughput || status=$?
exit $status
