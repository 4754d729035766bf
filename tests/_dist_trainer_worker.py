"""Worker for test_distributed.py: a SharpBalance run in `torchrun --nproc_per_node 2` processes (gloo, CPU)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_args, make_trainer, mlp, vector_data
from test_distributed import RUN


def main(out_dir: str, result_path: str) -> None:
    from pathlib import Path

    args = make_args(Path(out_dir), **RUN)
    trainer = make_trainer(args, mlp, vector_data(n=RUN_N))
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({"weights": trainer.ensemble.state_dict(), "masks": trainer.sam_masks,
                    "scores": trainer.sample_scores, "history": trainer.scoring_history,
                    "world": trainer.accelerator.num_processes,
                    "wrapped": type(trainer.model_wrapped).__name__}, result_path)
    # without this, gloo's threads can outlive the interpreter: SIGABRT after a successful run
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


RUN_N = 16

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
