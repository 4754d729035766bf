"""Members mode: W processes (W = 3 and W = 2 for m = 3, uneven ownership) train each member exactly as one process
does: weights, masks, scores, logged per-member losses and evaluation equal the 1-process run; resume is bitwise."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import image_data, make_args, make_trainer, small_cnn
from test_distributed import _free_port

COMMON = dict(num_members=3, num_train_epochs=2, per_device_train_batch_size=4, per_device_eval_batch_size=2,
              rho=0.2, learning_rate=0.05)
RUNS = {
    "deep_ensemble": dict(ensemble_method="deep_ensemble", **COMMON),
    "sam": dict(ensemble_method="sam", **COMMON),
    "sharpbalance": dict(ensemble_method="sharpbalance", scoring_start_epoch=1, sam_fraction=0.3, **COMMON),
}
RESUME = dict(ensemble_method="sharpbalance", scoring_start_epoch=1, sam_fraction=0.3, optim="adamw_torch",
              save_strategy="steps", save_steps=1, **{**COMMON, "num_train_epochs": 3})
EVAL = {"resume_step": 6}  # 4 steps per epoch (14 rows, 4 per member): mid-epoch 1, after Td = 1


def build():
    return small_cnn(dropout=0.2)


def train_data():
    return image_data(n=14, augment=True)


def eval_data():
    return image_data(n=7, seed=3)


def _launch(tmp, world):
    result = tmp / f"members_{world}.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           env["MASTER_PORT"], os.path.join(os.path.dirname(__file__), "_members_worker.py"), str(tmp / "d"), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(result, weights_only=False)
    assert out["world"] == world
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("members_single")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, kw in RUNS.items():
            trainer = make_trainer(make_args(tmp / method, **kw), build, train_data(), eval_dataset=eval_data())
            trainer.train()
            out[method] = {"weights": trainer.ensemble.state_dict(), "masks": trainer.sam_masks,
                           "scores": trainer.sample_scores, "metrics": trainer.evaluate(),
                           "logs": [log for log in trainer.state.log_history if "loss" in log]}
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("world", [3, 2], ids=["W3", "W2-uneven"])
def test_members_mode_equals_one_process(tmp_path, single, world):
    dist = _launch(tmp_path, world)
    assert dist["deep_ensemble"]["owned"] == [i for i in range(3) if i % world == 0]  # rank 0: [0] or [0, 2]
    for method in RUNS:
        d, s = dist[method], single[method]
        for (name, a), b in zip(d["weights"].items(), s["weights"].values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{method} {name}")
        if method == "sharpbalance":
            assert torch.equal(d["masks"], s["masks"])
            torch.testing.assert_close(d["scores"], s["scores"], rtol=1e-6, atol=0)
        assert len(d["logs"]) == len(s["logs"]) > 0
        for dl, sl in zip(d["logs"], s["logs"]):
            for key in [k for k in sl if k.startswith(("member_", "loss"))]:
                assert dl[key] == pytest.approx(sl[key], abs=1e-6), (method, key)
        for key in [k for k in s["metrics"] if not k.endswith(("runtime", "per_second"))]:
            assert d["metrics"][key] == pytest.approx(s["metrics"][key], abs=1e-6), (method, key)
    r = dist["resume"]
    for (name, a), b in zip(r["resumed"].items(), r["full"].values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(r["resumed_masks"], r["full_masks"]) and r["history"][0] == r["history"][1]
    # the same checkpoint resumes on ONE process (another W, data mode): one format whatever W
    one = make_trainer(make_args(tmp_path / "one", **RESUME), build, train_data())
    one.train(resume_from_checkpoint=str(tmp_path / "d" / "full" / "out" / f"checkpoint-{EVAL['resume_step']}"))
    for (name, a), b in zip(one.ensemble.state_dict().items(), r["full"].values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert torch.equal(one.sam_masks, r["full_masks"])


def test_ownership_and_refusal_of_more_processes_than_members(tmp_path):
    from sbtrainer.trainer import _owned_members

    args = make_args(tmp_path, ensemble_parallelism="members", num_members=3)
    assert [_owned_members(3, args, 2, r) for r in range(2)] == [[0, 2], [1]]
    assert [_owned_members(3, args, 3, r) for r in range(3)] == [[0], [1], [2]]
    assert _owned_members(3, make_args(tmp_path, num_members=3), 2, 1) == [0, 1, 2]  # data mode: every member
    with pytest.raises(ValueError, match=r"ensemble_parallelism='members' needs at most one process per member"):
        _owned_members(3, args, 4, 0)
