"""Two processes (torchrun, gloo on CPU) equal one process with gradient accumulation 2, scoring included."""

import os
import socket
import subprocess
import sys

import torch
from helpers import make_args, make_trainer, mlp, vector_data

RUN = dict(ensemble_method="sharpbalance", num_members=2, num_train_epochs=3, scoring_start_epoch=1, sam_fraction=0.3,
           per_device_train_batch_size=4, rho=0.2, learning_rate=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    result = tmp_path / "dist.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
           os.path.join(os.path.dirname(__file__), "_dist_trainer_worker.py"), str(tmp_path / "d"), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = torch.load(result, weights_only=False)
    assert dist["world"] == 2
    assert dist["wrapped"] == "EnsembleModel"  # no DDP wrapper: gradients are all-reduced by the trainer

    single = make_trainer(make_args(tmp_path / "s", gradient_accumulation_steps=2, **RUN), mlp, vector_data(n=16))
    single.train()
    assert dist["history"] == single.scoring_history == [{"epoch": 1, "global_step": 2}]
    torch.testing.assert_close(dist["scores"], single.sample_scores, rtol=1e-6, atol=0)
    assert torch.equal(dist["masks"], single.sam_masks)
    for (name, a), b in zip(dist["weights"].items(), single.ensemble.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
