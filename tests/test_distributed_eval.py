"""Two processes equal one: evaluation on an uneven split (7 rows, 2 per process-batch) and training whose last
accumulation window is short (14 rows, 4 per member-batch), against one process with accumulation 2."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import make_args, make_trainer, mlp, vector_data
from test_distributed import _free_port

RUN = dict(ensemble_method="sam", num_members=2, num_train_epochs=2, per_device_train_batch_size=4,
           per_device_eval_batch_size=2, rho=0.2, learning_rate=0.1)
TRAIN_N, EVAL_N = 14, 7


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_eval")
    result = tmp / "dist.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
           os.path.join(os.path.dirname(__file__), "_dist_eval_worker.py"), str(tmp / "d"), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(result, weights_only=False)
    assert out["world"] == 2
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single_eval")
    trainer = make_trainer(make_args(tmp, gradient_accumulation_steps=2, **RUN), mlp, vector_data(n=TRAIN_N),
                           eval_dataset=vector_data(n=EVAL_N, seed=9))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.args.prediction_loss_only = True
    return {"weights": trainer.ensemble.state_dict(), "metrics": metrics, "loss_only": trainer.evaluate(),
            "train_logs": [log for log in trainer.state.log_history if "loss" in log]}


def test_uneven_last_window_two_processes_equal_one_with_accumulation(two_processes, one_process):
    for (name, a), b in zip(two_processes["weights"].items(), one_process["weights"].values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for d, s in zip(two_processes["train_logs"], one_process["train_logs"], strict=True):
        assert d["loss"] == pytest.approx(s["loss"], abs=1e-6)


def test_every_eval_number_of_two_processes_equals_one_process(two_processes, one_process):
    dist, single = two_processes["metrics"], one_process["metrics"]
    keys = [k for k in single if not k.endswith(("runtime", "per_second"))]
    assert "eval_loss" in keys and "eval_ensemble_accuracy" in keys and len(keys) > 10
    for key in keys:
        assert dist[key] == pytest.approx(single[key], abs=1e-6), key
    assert two_processes["loss_only"]["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-6)
    assert one_process["loss_only"]["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-7)
