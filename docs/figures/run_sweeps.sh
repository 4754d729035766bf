#!/usr/bin/env bash
# Small real-CIFAR-10 runs of recipes/tradeoff.py's sweeps (issue 13's "one run at a stated small size").
# usage: bash docs/figures/run_sweeps.sh <calib|curvature|width|size|sparsity>   (CIFAR-10 copy: $SBTRAINER_CIFAR10)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=".venv/bin/python recipes/tradeoff.py"
OUT=outputs/sweeps
DATA="${SBTRAINER_CIFAR10:-../shared/data/cifar10}"
# shared small-size flags: real CIFAR-10 copy, CPU, one thread, no checkpoints, small corrupted set
COMMON=(--dataset_name "$DATA" --use_cpu true --num_threads 1 --dataloader_num_workers 0
        --save_strategy no --disable_tqdm true --report_to none --logging_steps 10
        --per_device_train_batch_size 32 --max_eval_samples 500
        --corrupt_offline true --corrupt_samples 100 --corruptions gaussian_noise defocus_blur contrast jpeg_compression
        --severities 3 5 --sharpness_batches 10 --sharpness_steps 10)
run() { local name=$1; shift; mkdir -p $OUT/$name
        /usr/bin/time -f "$name wall %e s" nice -n 5 $PY "$@" --output_dir $OUT/$name "${COMMON[@]}" 2>&1 | tee $OUT/$name.log | grep -E "wall|ERROR|Error|Traceback|Spearman|ensemble [0-9]+ of" ; }
case $1 in
  calib)  # one SAM ensemble, width 4, 2 members, 500 rows, 2 epochs
    run calib recipes/configs/tradeoff_width_cifar10.yaml --widths 4 --rhos 0.05 --num_members 2 --member_seeds 13 17 \
        --max_train_samples 500 --num_train_epochs 2 --lr_milestones 1 --scoring_start_epoch 1 ;;
  curvature)
    # Fig. 14: one SharpBalance ensemble (rho 0.2, k 0.4), width 8, 2 members, 1000 rows x 5 epochs; 1000 ranked rows
    run curvature recipes/configs/tradeoff_curvature_cifar10.yaml --model_width 8 --num_members 2 --member_seeds 13 17 \
        --max_train_samples 1000 --num_train_epochs 5 --lr_milestones 4 --scoring_start_epoch 3 \
        --curvature_samples 1000 --curvature_member 0 --curvature_directions 10 ;;
  width)
    # Fig. 5a: widths 4 8 16 x SAM rho {0.01 0.03 0.1 0.4} (from App. D.2's grid), 2 members, 400 rows x 4 epochs
    run width recipes/configs/tradeoff_width_cifar10.yaml --widths 4 8 16 --rhos 0.01 0.03 0.1 0.4 \
        --num_members 2 --member_seeds 13 17 --max_train_samples 400 --num_train_epochs 4 --lr_milestones 3 \
        --scoring_start_epoch 1 ;;
  size)
    # Fig. 15 on CIFAR-10 (the paper's is CIFAR-100): m = 2 3 4 x deep_ensemble sam sharpbalance, width 4,
    # rho 0.2, k 0.4 (Table 1, CIFAR-10), 400 rows x 4 epochs
    run ensemble_size recipes/configs/tradeoff_ensemble_size_cifar100.yaml --label_column label --sam_fraction 0.4 \
        --ensemble_sizes 2 3 4 --model_width 4 --max_train_samples 400 --num_train_epochs 4 --lr_milestones 3 \
        --scoring_start_epoch 2 ;;
  sparsity)
    # Fig. 5b: sparsities 0 0.8 0.95 x SAM rho {0.01 0.1 0.4}, width 8, pruned at the start of epoch 1, 2 members,
    # 400 rows x 4 epochs
    run sparsity recipes/configs/tradeoff_sparsity_cifar10.yaml --sparsities 0 0.8 0.95 --rhos 0.01 0.1 0.4 \
        --prune_epoch 1 --model_width 8 --num_members 2 --member_seeds 13 17 --max_train_samples 400 \
        --num_train_epochs 4 --lr_milestones 3 --scoring_start_epoch 1 ;;
esac
