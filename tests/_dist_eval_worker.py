"""Worker for test_distributed_eval.py: uneven training and evaluation in `torchrun --nproc_per_node 2` (gloo, CPU)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_args, make_trainer, mlp, vector_data
from test_distributed_eval import EVAL_N, RUN, TRAIN_N


def main(out_dir: str, result_path: str) -> None:
    from pathlib import Path

    trainer = make_trainer(make_args(Path(out_dir), **RUN), mlp, vector_data(n=TRAIN_N),
                           eval_dataset=vector_data(n=EVAL_N, seed=9))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.args.prediction_loss_only = True
    loss_only = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        torch.save({"weights": trainer.ensemble.state_dict(), "metrics": metrics, "loss_only": loss_only,
                    "world": trainer.accelerator.num_processes,
                    "train_logs": [log for log in trainer.state.log_history if "loss" in log]}, result_path)
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
