#!/usr/bin/env bash
# Copy the CIFAR-10 parquet files (21 MB) into .gpu_data/cifar10 (git-ignored) so a GPU run can carry them:
#   bash benchmarks/prepare_gpu_data.sh [SOURCE]     # SOURCE default ../shared/data/cifar10
set -eu
cd "$(dirname "$0")/.."
SRC="${1:-../shared/data/cifar10}"
mkdir -p .gpu_data/cifar10/plain_text
cp "$SRC"/plain_text/*.parquet .gpu_data/cifar10/plain_text/
du -sh .gpu_data
