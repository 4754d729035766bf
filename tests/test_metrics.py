"""Tests for sbtrainer.metrics: each metric against a value computed by hand in the comments."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sbtrainer import metrics as M

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def onehot_logits(preds: list[list[int]], num_classes: int, margin: float = 2.0) -> torch.Tensor:
    """Member logits ``(N, m, C)``: ``margin`` on the predicted class of preds[n][i], 0 elsewhere."""
    p = torch.tensor(preds)
    return torch.nn.functional.one_hot(p, num_classes).double() * margin


def prob_logits(probs: list[list[float]]) -> torch.Tensor:
    """One-member logits ``(N, 1, C)`` whose softmax is ``probs`` (log-probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log()[:, None, :]


# --------------------------------------------------------------------------- accuracy, EIR, DER

# 5 samples, 3 members, 3 classes.      label   m0  m1  m2   vote      mean logits (margin 2)
LABELS = [0, 1, 2, 0, 0]  #               s0: 0    0   0   1    0         [4/3, 2/3, 0] -> 0 ok
PREDS = [  #                               s1: 1    1   2   1    1         [0, 4/3, 2/3] -> 1 ok
    [0, 0, 1],  #                          s2: 2    2   2   2    2         -> 2 ok
    [1, 2, 1],  #                          s3: 0    1   0   0    0         [4/3, 2/3, 0] -> 0 ok
    [2, 2, 2],  #                          s4: 0    1   2   1    1         [0, 4/3, 2/3] -> 1 wrong
    [1, 0, 0],
    [1, 2, 1],
]
# member errors: m0 {s3, s4}, m1 {s1, s4}, m2 {s0, s4} -> 2/5 each; ensemble error 1/5.
# EIR = (0.4 - 0.2) / 0.4 = 0.5 (same for the vote).
# disagreement: (m0,m1) s1,s3,s4 = 3/5; (m0,m2) s0,s3 = 2/5; (m1,m2) s0,s1,s4 = 3/5 -> mean 8/15.
# DER = (8/15) / 0.4 = 4/3.


def test_accuracy_eir_der_disagreeing_members():
    logits = onehot_logits(PREDS, 3)
    assert M.member_accuracies(logits, LABELS) == pytest.approx([0.6, 0.6, 0.6], abs=1e-15)
    assert M.member_accuracy(logits, LABELS) == pytest.approx(0.6, abs=1e-15)
    assert M.ensemble_accuracy(logits, LABELS) == pytest.approx(0.8, abs=1e-15)
    assert M.eir(logits, LABELS) == pytest.approx(0.5, abs=1e-12)
    assert M.eir(logits, LABELS, reduction="probs") == pytest.approx(0.5, abs=1e-12)
    assert M.eir_vote(logits, LABELS) == pytest.approx(0.5, abs=1e-12)
    assert M.disagreement(logits) == pytest.approx(8 / 15, abs=1e-12)
    assert M.der(logits, LABELS) == pytest.approx(4 / 3, abs=1e-12)


def test_agreeing_members_have_zero_der_eir_kl_variance():
    # 3 identical members predicting [0, 1, 1, 2] on labels [0, 1, 2, 2]: every error is 1/4, the
    # ensemble makes the same predictions -> EIR = (1/4 - 1/4) / (1/4) = 0; no disagreement -> DER = 0.
    member = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.5, 4.0, 0.0], [0.0, 0.0, 1.0]])
    logits = member[:, None, :].repeat(1, 3, 1)
    labels = np.array([0, 1, 2, 2])
    assert M.eir(logits, labels) == 0.0
    assert M.eir_vote(logits, labels) == 0.0
    assert M.der(logits, labels) == 0.0
    assert M.kl(logits) == pytest.approx(0.0, abs=1e-15)
    assert M.variance(logits) == 0.0
    assert M.ensemble_accuracy(logits, labels) == M.member_accuracy(logits, labels) == 0.75


def test_agreeing_predictions_different_logits_eir_zero():
    # Members share the argmax on every sample but not the logits: mean logits keep that argmax,
    # so ensemble error = member error = 1/2 -> EIR = 0, DER = 0.
    logits = torch.tensor([[[2.0, 0.0], [5.0, 1.0]], [[0.0, 1.0], [0.3, 3.0]]])  # (2, 2, 2)
    labels = [0, 0]
    assert M.eir(logits, labels) == 0.0
    assert M.der(logits, labels) == 0.0
    assert M.disagreement(logits) == 0.0


def test_vote_ties_go_to_lowest_class_index():
    # 2 members vote class 2 and class 1: a tie, broken towards class 1 (lowest index) -> correct.
    # Mean logits [0, 1, 1.5] -> class 2 -> wrong. Member errors: m0 wrong, m1 right -> 1/2.
    logits = torch.tensor([[[0.0, 0.0, 3.0], [0.0, 2.0, 0.0]]])
    labels = [1]
    assert M.eir_vote(logits, labels) == pytest.approx((0.5 - 0.0) / 0.5)
    assert M.eir(logits, labels) == pytest.approx((0.5 - 1.0) / 0.5)


def test_eir_der_nan_when_members_perfect():
    logits = onehot_logits([[0, 0], [1, 1]], 2)
    assert math.isnan(M.eir(logits, [0, 1]))
    assert math.isnan(M.der(logits, [0, 1]))


def test_probs_and_logits_reduction_differ():
    # m0 = [10, 0], m1 = m2 = [0, 2], label 1.
    # mean logits = [10/3, 4/3] -> class 0 (wrong).
    # mean softmax: class 1 = (sigmoid(-10) + 2 sigmoid(2)) / 3 = (4.54e-5 + 2 * 0.880797) / 3 = 0.5872 -> class 1.
    logits = torch.tensor([[[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    labels = [1]
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    p1_probs = (s(-10) + 2 * s(2)) / 3
    p1_logits = s(4 / 3 - 10 / 3)
    assert M.ensemble_accuracy(logits, labels, "logits") == 0.0
    assert M.ensemble_accuracy(logits, labels, "probs") == 1.0
    assert M.ensemble_probs(logits, "probs")[0, 1].item() == pytest.approx(p1_probs, abs=1e-15)
    assert M.ensemble_nll(logits, labels, "probs") == pytest.approx(-math.log(p1_probs), abs=1e-14)
    assert M.ensemble_nll(logits, labels, "logits") == pytest.approx(-math.log(p1_logits), abs=1e-14)
    # member errors 1/3; ensemble error 1 (logits) or 0 (probs): EIR = -2 or 1
    assert M.eir(logits, labels, "logits") == pytest.approx(-2.0)
    assert M.eir(logits, labels, "probs") == pytest.approx(1.0)


# --------------------------------------------------------------------------- variance and KL


def test_variance_unbiased_by_hand():
    # One sample, 3 members, 2 classes: class 0 logits (0, 1, 2) -> ddof=1 variance 1;
    # class 1 logits (0, 2, 4) -> 4. Mean over classes 2.5 (ddof=0 would give 5/3); sum 5.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]])
    assert M.variance(logits) == pytest.approx(2.5, abs=1e-15)
    assert M.variance(logits, classes="sum") == pytest.approx(5.0, abs=1e-15)
    # Two samples: second sample all-equal -> 0; average over samples 1.25.
    two = torch.cat([logits, torch.ones(1, 3, 2)])
    assert M.variance(two) == pytest.approx(1.25, abs=1e-15)


def test_kl_by_hand():
    # p = (0.5, 0.5), q = (0.8, 0.2).
    # KL(p||q) = 0.5 log(0.5/0.8) + 0.5 log(0.5/0.2) = 0.223144
    # KL(q||p) = 0.8 log(0.8/0.5) + 0.2 log(0.2/0.5) = 0.192745; mean over the 2 ordered pairs.
    logits = torch.tensor([[[0.0, 0.0], [math.log(0.8), math.log(0.2)]]], dtype=torch.float64)
    kl_pq = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    kl_qp = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert M.kl(logits) == pytest.approx((kl_pq + kl_qp) / 2, abs=1e-14)
    # Third member identical to p: ordered pairs (p,q),(q,p),(p,p'),(p',p),(q,p'),(p',q) -> 2(kl_pq+kl_qp)/6.
    three = torch.cat([logits, torch.zeros(1, 1, 2)], dim=1)
    assert M.kl(three) == pytest.approx(2 * (kl_pq + kl_qp) / 6, abs=1e-14)


# --------------------------------------------------------------------------- NLL, ECE, Brier

# 5 samples, 1 member, 2 classes; num_bins = 4 -> bins (0,.25] (.25,.5] (.5,.75] (.75,1].
ECE_PROBS = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5], [0.6, 0.4]]
ECE_LABELS = [0, 1, 1, 1, 0]
# conf / correct: .9 yes (bin 3), .8 no (bin 3), .7 yes (bin 2), .5 no (pred 0 by first max; bin 1: .5 is
# in (.25, .5]), .6 yes (bin 2).
# bin 3: 2/5 * |1/2 - .85| = .14;  bin 2: 2/5 * |1 - .65| = .14;  bin 1: 1/5 * |0 - .5| = .1 -> ECE .38
# (with [lo, hi) bins .5 would join bin 2: 3/5 * |2/3 - .6| = .04 -> .18; so the test pins (lo, hi]).


def test_ece_by_hand():
    logits = prob_logits(ECE_PROBS)
    assert M.ensemble_ece(logits, ECE_LABELS, num_bins=4) == pytest.approx(0.38, abs=1e-12)
    assert M.member_ece(logits, ECE_LABELS, num_bins=4) == pytest.approx(0.38, abs=1e-12)
    # one bin: |acc - conf| = |3/5 - (.9+.8+.7+.5+.6)/5| = |.6 - .7| = .1
    assert M.ensemble_ece(logits, ECE_LABELS, num_bins=1) == pytest.approx(0.1, abs=1e-12)


def test_brier_and_nll_by_hand():
    logits = prob_logits(ECE_PROBS)
    # (p - onehot)^2 summed over 2 classes = 2 (1 - p_y)^2:
    # p_y = .9, .2, .7, .5, .6 -> 2 * (.01 + .64 + .09 + .25 + .16) / 5 = 2 * 1.15 / 5 = .46
    assert M.ensemble_brier(logits, ECE_LABELS) == pytest.approx(0.46, abs=1e-12)
    assert M.member_brier(logits, ECE_LABELS) == pytest.approx(0.46, abs=1e-12)
    nll = -(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.5) + math.log(0.6)) / 5
    assert M.ensemble_nll(logits, ECE_LABELS) == pytest.approx(nll, abs=1e-12)
    assert M.member_nll(logits, ECE_LABELS) == pytest.approx(nll, abs=1e-12)


def test_member_calibration_is_mean_over_members():
    # members: m0 softmax (0.9, 0.1), m1 softmax (0.4, 0.6); label 0.
    # NLL: (-log .9 - log .4) / 2;  Brier: (2 * .01 + 2 * .36) / 2 = .37;
    # ECE (15 bins, one sample): m0 |1 - .9| = .1, m1 pred 1 wrong |0 - .6| = .6 -> mean .35.
    logits = torch.tensor([[[0.9, 0.1], [0.4, 0.6]]], dtype=torch.float64).log()
    assert M.member_nll(logits, [0]) == pytest.approx(-(math.log(0.9) + math.log(0.4)) / 2, abs=1e-14)
    assert M.member_brier(logits, [0]) == pytest.approx(0.37, abs=1e-14)
    assert M.member_ece(logits, [0]) == pytest.approx(0.35, abs=1e-14)
    # ensemble by probs: (0.65, 0.35): NLL -log .65, Brier 2 * .35^2 = .245, ECE |1 - .65| = .35
    assert M.ensemble_nll(logits, [0], "probs") == pytest.approx(-math.log(0.65), abs=1e-14)
    assert M.ensemble_brier(logits, [0], "probs") == pytest.approx(0.245, abs=1e-14)
    assert M.ensemble_ece(logits, [0], "probs") == pytest.approx(0.35, abs=1e-14)


# --------------------------------------------------------------------------- ensemble_metrics / Trainer hook

KEYS = {
    "ensemble_accuracy", "member_accuracy", "member_0_accuracy", "member_1_accuracy", "member_2_accuracy",
    "eir", "eir_vote", "der", "variance", "kl", "ensemble_nll", "ensemble_ece", "ensemble_brier",
    "member_nll", "member_ece", "member_brier",
}  # fmt: skip


def test_ensemble_metrics_keys_and_values():
    logits = onehot_logits(PREDS, 3)
    out = M.ensemble_metrics(logits.numpy(), np.array(LABELS))
    assert set(out) == KEYS
    assert all(isinstance(v, float) for v in out.values())
    assert out["eir"] == pytest.approx(0.5) and out["der"] == pytest.approx(4 / 3)
    assert out["member_1_accuracy"] == pytest.approx(0.6)
    assert out["ensemble_ece"] == M.ensemble_ece(logits, LABELS)


def test_ensemble_metrics_single_member_omits_diversity():
    out = M.ensemble_metrics(prob_logits(ECE_PROBS), ECE_LABELS, num_bins=4)
    assert not set(M.DIVERSITY_KEYS) & set(out)
    assert out["eir"] == 0.0 and out["ensemble_ece"] == pytest.approx(0.38)


def test_compute_metrics_reads_member_logits_from_eval_prediction():
    logits = onehot_logits(PREDS, 3).numpy()
    compute = M.make_compute_metrics(reduction="probs", num_bins=4)
    expected = M.ensemble_metrics(logits, LABELS, reduction="probs", num_bins=4)
    for preds in [(logits.mean(1), logits), [logits.mean(1), logits]]:
        pred = SimpleNamespace(predictions=preds, label_ids=np.array(LABELS))
        assert compute(pred) == expected


def test_compute_metrics_with_transformers_eval_prediction():
    from transformers import EvalPrediction

    logits = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(1)).numpy()
    labels = np.array([0, 1, 2, 3, 0, 1])
    pred = EvalPrediction(predictions=(logits.mean(1), logits), label_ids=labels)
    assert M.make_compute_metrics()(pred) == M.ensemble_metrics(logits, labels)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.ensemble_accuracy(torch.zeros(4, 3), [0] * 4), r"member_logits must be 3-D.*\(4, 3\)"),
        (lambda: M.ensemble_accuracy(torch.zeros(4, 2, 3), [0] * 5), r"labels must be 1-D.*N=4.*\(5,\)"),
        (lambda: M.ensemble_accuracy(torch.zeros(4, 2, 3), [0, 1, 2, 3]), r"labels must lie in \[0, C\).*3"),
        (lambda: M.eir(torch.zeros(4, 2, 3), [0] * 4, reduction="mean"), r"reduction must be one of.*'mean'"),
        (lambda: M.ensemble_ece(torch.zeros(4, 2, 3), [0] * 4, num_bins=0), r"num_bins must be.*>= 1.*0"),
        (lambda: M.der(torch.zeros(4, 1, 3), [0] * 4), r"der .*m >= 2.*m=1"),
        (lambda: M.variance(torch.zeros(4, 1, 3)), r"variance .*m >= 2.*m=1"),
        (lambda: M.kl(torch.zeros(4, 1, 3)), r"kl .*m >= 2.*m=1"),
        (lambda: M.make_compute_metrics(reduction="max"), r"reduction must be one of.*'max'"),
        (lambda: M.ensemble_metrics(torch.zeros(4, 2, 3), [0] * 4, num_bins=-1), r"num_bins.*-1"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    sys.path.insert(0, str(TESTS))
    try:
        import _dist_metrics_worker as worker
    finally:
        sys.path.remove(str(TESTS))
    out = tmp_path / "dist.json"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(TESTS / "_dist_metrics_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert set(got) == {case[0] for case in worker.CASES}
    for name, n, m, c, _split, reduction in worker.CASES:
        logits, labels = worker.case_data(n, m, c)
        expected = M.ensemble_metrics(logits, labels, reduction=reduction)
        assert set(got[name]) == set(expected), name
        for key, value in expected.items():
            assert got[name][key] == pytest.approx(value, abs=1e-12, rel=0), (name, key)
