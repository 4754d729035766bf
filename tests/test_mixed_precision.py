"""fp16 on CPU, as on a GPU: autocast(float16) + torch.amp.GradScaler installed by hand on the accelerator.

(accelerate makes neither for `fp16=True, use_cpu=True`, which the config refuses; the step is the same code.)
"""

import pytest
import torch
from helpers import make_args, make_trainer, mlp, vector_data


def _run(tmp_path, fp16: bool, inject=None, **kw):
    args = make_args(tmp_path, ensemble_method="sam", num_members=1, max_steps=1, per_device_train_batch_size=8,
                     rho=0.3, learning_rate=0.1, **kw)
    trainer = make_trainer(args, lambda: mlp(hidden=16), vector_data(n=8))
    if fp16:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.accelerator.autocast = lambda *a, **k: torch.autocast("cpu", dtype=torch.float16)
    if inject is not None:
        backward, calls = trainer._backward, []

        def poisoned(loss):
            calls.append(1)
            backward(loss * float("inf") if len(calls) == inject else loss)

        trainer._backward = poisoned
    before = [p.detach().clone() for p in trainer.ensemble.parameters()]
    trainer.train()
    return trainer, before, next(log for log in trainer.state.log_history if "loss" in log)


def test_fp16_sam_step_equals_the_fp32_step_within_fp16_tolerance(tmp_path):
    fp32, before, log32 = _run(tmp_path / "a", fp16=False)
    fp16, _, log16 = _run(tmp_path / "b", fp16=True)
    for a, b, w0 in zip(fp16.ensemble.parameters(), fp32.ensemble.parameters(), before):
        step32 = b.detach() - w0
        torch.testing.assert_close(a.detach() - w0, step32, atol=2e-3 * float(step32.abs().max()) + 1e-5, rtol=2e-2)
    assert log16["member_0_ascent_grad_norm"] == pytest.approx(log32["member_0_ascent_grad_norm"], rel=1e-2)
    assert log16["grad_norm"] == pytest.approx(log32["grad_norm"], rel=1e-2)  # unscaled, not 1024x
    assert log16["skipped_optimizer_steps"] == 0 and log16["skipped_ascents"] == 0


def test_inf_in_the_descent_skips_the_optimizer_step_and_is_counted(tmp_path):
    trainer, before, log = _run(tmp_path, fp16=True, inject=2)  # call 1: ascent at θ; call 2: descent at θ + ε
    for p, w0 in zip(trainer.ensemble.parameters(), before):
        assert torch.equal(p.detach(), w0)  # the scaler skipped the step: weights untouched
    assert log["skipped_optimizer_steps"] == 1
    assert trainer.accelerator.scaler.get_scale() == 2.0**9  # and backed off


def test_inf_in_the_ascent_skips_the_perturbation_and_is_counted(tmp_path):
    sam, _, log = _run(tmp_path / "a", fp16=True, inject=1)
    assert log["skipped_ascents"] == 1 and log["skipped_optimizer_steps"] == 0
    plain_args = dict(ensemble_method="deep_ensemble", num_members=1, max_steps=1, per_device_train_batch_size=8,
                      learning_rate=0.1)
    plain = make_trainer(make_args(tmp_path / "b", **plain_args), lambda: mlp(hidden=16), vector_data(n=8))
    plain.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plain.accelerator.autocast = lambda *a, **k: torch.autocast("cpu", dtype=torch.float16)
    plain.train()
    for a, b in zip(sam.ensemble.parameters(), plain.ensemble.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # ε = 0: the step is the plain step
