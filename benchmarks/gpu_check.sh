#!/usr/bin/env bash
# The prepared GPU check (<= 5 minutes), run from the repo root on a lent GPU machine:
#   bash benchmarks/gpu_check.sh
# Eager bf16 + channels_last step timing, scoring and the paper-run projection (gpu_check.json), then
# torch.compile for deep_ensemble and sam within what is left (gpu_check_compile.json). JSON goes to
# $OUT when set, else benchmarks/results. Needs torch, transformers, accelerate, timm; not datasets/evaluate.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, timm, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
timeout 170 "$PY" benchmarks/gpu_check.py --budget-s 140 "$@"
echo "eager rc=$?"
timeout 110 "$PY" benchmarks/gpu_check.py --compile --methods deep_ensemble,sam --rounds 3 --budget-s 90 "$@"
echo "compile rc=$?"
