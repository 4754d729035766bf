#!/usr/bin/env bash
# The prepared GPU check (<= 5 minutes), run from the repo root on a lent GPU machine:
#   bash benchmarks/prepare_gpu_data.sh     # here, before the run: copies the CIFAR-10 parquet into .gpu_data/
#   run: bash benchmarks/gpu_check.sh       # with carry [".gpu_data"]
# 1. gpu_check.py: eager bf16 + channels_last step timing of the three methods (ResNet18, m=3, B=128),
#    CNN and transformer scoring throughput, the data path (CPU loader vs device pipeline), the paper-run
#    projection (gpu_check.json); 2. gpu_real_run.py: a short real CIFAR-10 run of the three methods with the
#    device pipeline (gpu_real_run.json); 3. torch.compile step timing for deep_ensemble and sam
#    (gpu_check_compile.json). Each writes its JSON as it goes ($OUT when set, else benchmarks/results).
# Needs torch, transformers, accelerate, timm, pyarrow; not datasets/evaluate. `--tiny` runs all of it on CPU.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${SBTRAINER_CIFAR10:-}" ] && [ -d .gpu_data/cifar10 ]; then export SBTRAINER_CIFAR10="$PWD/.gpu_data/cifar10"; fi
PY="${PYTHON:-python3}"
TINY=0; for a in "$@"; do [ "$a" = "--tiny" ] && TINY=1; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers, timm, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
echo "CIFAR-10: ${SBTRAINER_CIFAR10:-/work/shared/data/cifar10 (default)}"
if [ "$TINY" = 1 ]; then  # the CPU smoke path: no time limits, every section
  "$PY" benchmarks/gpu_check.py --device cpu --hide-datasets "$@" || exit 1
  "$PY" benchmarks/gpu_real_run.py --hide-datasets "$@" || exit 1
  exit 0
fi
timeout 150 "$PY" benchmarks/gpu_check.py --budget-s 120 "$@"
echo "eager rc=$?"
timeout 75 "$PY" benchmarks/gpu_real_run.py --budget-s 45 "$@"
echo "real run rc=$?"
timeout 70 "$PY" benchmarks/gpu_check.py --compile --methods deep_ensemble,sam --rounds 2 --budget-s 50 "$@"
echo "compile rc=$?"
