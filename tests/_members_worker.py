"""Worker for test_members_mode.py: members-mode runs under `torchrun --nproc_per_node W` (gloo, CPU)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_args, make_trainer
from test_members_mode import EVAL, RESUME, RUNS, build, eval_data, train_data


def main(out_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    out = {}
    for method, kw in RUNS.items():
        trainer = make_trainer(make_args(Path(out_dir) / method, ensemble_parallelism="members", **kw), build,
                               train_data(), eval_dataset=eval_data())
        trainer.train()
        out[method] = {"weights": trainer.ensemble.state_dict(), "masks": trainer.sam_masks,
                       "scores": trainer.sample_scores, "logs": [log for log in trainer.state.log_history if "loss" in log],
                       "metrics": trainer.evaluate(), "owned": trainer.owned_members}
    # resume: an uninterrupted run with checkpoints, then a run resumed from a mid-epoch checkpoint after Td
    full = make_trainer(make_args(Path(out_dir) / "full", ensemble_parallelism="members", **RESUME), build, train_data())
    full.train()
    resumed = make_trainer(make_args(Path(out_dir) / "resumed", ensemble_parallelism="members", **RESUME), build,
                           train_data())
    resumed.train(resume_from_checkpoint=str(Path(out_dir) / "full" / "out" / f"checkpoint-{EVAL['resume_step']}"))
    out["resume"] = {"full": full.ensemble.state_dict(), "resumed": resumed.ensemble.state_dict(),
                     "full_masks": full.sam_masks, "resumed_masks": resumed.sam_masks,
                     "history": (full.scoring_history, resumed.scoring_history)}
    if full.accelerator.is_main_process:
        out["world"] = full.accelerator.num_processes
        torch.save(out, result_path)
    full.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
