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


def test_two_simulated_nodes_equal_one_process_with_accumulation(tmp_path):
    """`torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1` (static rendezvous on this machine): every node has
    local rank 0, so anything keyed on the local rank instead of the global one would show here."""
    result = tmp_path / "nodes.pt"
    port = str(_free_port())
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "_dist_trainer_worker.py")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, worker,
                               str(tmp_path / f"node{r}"), str(result)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    nodes = torch.load(result, weights_only=False)
    assert nodes["world"] == 2
    assert not (tmp_path / "node1" / "out").exists() or not any((tmp_path / "node1" / "out").iterdir())
    single = make_trainer(make_args(tmp_path / "s", gradient_accumulation_steps=2, **RUN), mlp, vector_data(n=16))
    single.train()
    assert nodes["history"] == single.scoring_history
    assert torch.equal(nodes["masks"], single.sam_masks)
    for (name, a), b in zip(nodes["weights"].items(), single.ensemble.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
