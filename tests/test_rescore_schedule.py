"""The ``rescore_every`` schedule end to end: scoring at Td, Td + N, Td + 2N; masks re-installed; history checkpointed.

A 2-member SharpBalance run on 16 rows (B = 4, so 4 optimizer steps per epoch) for 6 epochs with Td = 1 and
N = 2 scores at the start of epochs 1, 3 and 5, i.e. before global steps 4, 12 and 20. With 2 members and
k = 0.25, ``D_0^SAM`` is member 1's top-4 rows and ``D_1^SAM`` member 0's (paper Sec. 4.3), which the test
checks by hand next to `sbtrainer.partition.partition`.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import make_args, make_trainer, mlp, vector_data
from transformers import TrainerCallback

from sbtrainer.partition import partition
from sbtrainer.scoring import is_scoring_epoch

STEPS_PER_EPOCH = 4
EPOCHS = 6
SCORING_STEPS = {1: 4, 3: 12, 5: 20}  # epoch -> global step of the scoring
HISTORY = [{"epoch": e, "global_step": s} for e, s in SCORING_STEPS.items()]
K = 0.25


def _args(path, **kw):
    return make_args(path, ensemble_method="sharpbalance", num_members=2, member_seeds=[3, 8], num_train_epochs=EPOCHS,
                     scoring_start_epoch=1, rescore_every=2, sam_fraction=K, per_device_train_batch_size=4,
                     rho=0.2, learning_rate=0.2, **kw)


def _build():
    return mlp(dropout=0.2)


def _data():
    return vector_data(n=16)


class _Recorder(TrainerCallback):
    """At every step's start: the masks and scores the step trains with, the history length, and by-hand scores."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps: dict[int, tuple] = {}
        self.hand_scores: dict[int, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer
        masks = None if t.sam_masks is None else t.sam_masks.clone()
        scores = None if t.sample_scores is None else t.sample_scores.clone()
        self.steps[state.global_step] = (masks, scores, len(t.scoring_history))
        if state.global_step in SCORING_STEPS.values():
            self.hand_scores[state.global_step] = _hand_scores(t)
        return control


def _hand_scores(trainer) -> torch.Tensor:
    """``||grad_theta CE(f(x_r), y_r)||^2`` of every member and row, in eval mode, one row at a time: (m, N)."""
    data = trainer.train_dataset
    out = torch.zeros(trainer.ensemble.num_members, len(data))
    for i, member in enumerate(trainer.ensemble.members):
        member.eval()
        params = list(member.parameters())
        for r in range(len(data)):
            loss = F.cross_entropy(member(data.x[r : r + 1]), data.y[r : r + 1])
            out[i, r] = sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params))
        member.train()
    return out


class _SaveAt(TrainerCallback):
    """Checkpoint after exactly these global steps (cheaper than ``save_steps=1``)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps
        return control


SAVED = (12, 13, 16, 24)


def _train(path, resume=None, save=()):
    trainer = make_trainer(_args(path), _build, _data())
    recorder = _Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(_SaveAt(save))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("rescore")
    trainer, recorder = _train(path, save=SAVED)
    assert sorted(p.name for p in (path / "out").iterdir()) == [f"checkpoint-{s}" for s in SAVED]
    return path, trainer, recorder


def _top4(scores: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    mask[torch.topk(scores, 4).indices] = True
    return mask


def test_scores_at_td_td_plus_n_td_plus_2n(run):
    _, trainer, recorder = run
    assert trainer.state.global_step == EPOCHS * STEPS_PER_EPOCH == 24
    assert trainer.scoring_history == HISTORY
    assert trainer.last_scored_epoch == 5
    assert sorted(recorder.steps) == list(range(24))
    # history length seen by each step: 0 before step 4, then 1, 2, 3
    assert [recorder.steps[s][2] for s in range(24)] == [0] * 4 + [1] * 8 + [2] * 8 + [3] * 4


def test_masks_are_reinstalled_from_each_scoring(run):
    _, trainer, recorder = run
    for step in range(4):  # epoch 0 (< Td): SAM on all rows, no masks yet
        assert recorder.steps[step][0] is None and recorder.steps[step][1] is None
    installed = []
    for start in SCORING_STEPS.values():
        masks, scores, _ = recorder.steps[start]
        # the scores are the per-sample sharpness of the weights at the scoring (computed here by hand)
        torch.testing.assert_close(scores, recorder.hand_scores[start], rtol=1e-5, atol=1e-7)
        assert torch.equal(masks, partition(scores, K, "highest", "none"))
        assert torch.equal(masks[0], _top4(scores[1])) and torch.equal(masks[1], _top4(scores[0]))
        assert masks.sum(dim=1).tolist() == [4, 4]
        # the same masks and scores are used for every step until the next scoring (2 epochs = 8 steps)
        for step in range(start, min(start + 2 * STEPS_PER_EPOCH, 24)):
            assert torch.equal(recorder.steps[step][0], masks) and torch.equal(recorder.steps[step][1], scores)
        installed.append((masks, scores))
    assert torch.equal(trainer.sam_masks, installed[-1][0]) and torch.equal(trainer.sample_scores, installed[-1][1])
    # Training moves the weights, so each scoring gives new scores; on these 16 rows the top-4 sets move too.
    for (m_a, s_a), (m_b, s_b) in itertools.pairwise(installed):
        assert not torch.equal(s_a, s_b)
        assert not torch.equal(m_a, m_b)


def _state(path, step):
    return torch.load(path / "out" / f"checkpoint-{step}" / "sharpbalance_state.pt", weights_only=True)


def test_history_is_checkpointed(run):
    path, trainer, recorder = run
    before = _state(path, 12)  # written at the end of epoch 2, before the second scoring
    assert before["scoring_history"] == HISTORY[:1] and before["last_scored_epoch"] == 1
    assert torch.equal(before["sam_masks"], recorder.steps[4][0])
    after = _state(path, 13)  # the first checkpoint after the second scoring
    assert after["scoring_history"] == HISTORY[:2] and after["last_scored_epoch"] == 3
    assert torch.equal(after["sam_masks"], recorder.steps[12][0])
    assert torch.equal(after["sample_scores"], recorder.steps[12][1])
    assert after["member_seeds"] == [3, 8] and after["ensemble_method"] == "sharpbalance"
    final = _state(path, 24)
    assert final["scoring_history"] == HISTORY and torch.equal(final["sam_masks"], trainer.sam_masks)


@pytest.mark.parametrize("step", [12, 13, 16], ids=["boundary-before-2nd", "mid-epoch-after-2nd", "boundary-after-2nd"])
def test_resume_between_scorings_is_bitwise_equal(run, tmp_path, step):
    """Resuming just before the second scoring (which the resumed run must make), or between the second and the
    third, replays the rest of the run bitwise: weights, masks, scores, history and the masks of every step."""
    path, full, full_rec = run
    resumed, rec = _train(tmp_path, resume=str(path / "out" / f"checkpoint-{step}"))
    assert resumed.state.global_step == 24
    for a, b in zip(resumed.ensemble.state_dict().values(), full.ensemble.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed.sam_masks, full.sam_masks)
    assert torch.equal(resumed.sample_scores, full.sample_scores)
    assert resumed.scoring_history == full.scoring_history == HISTORY
    assert sorted(rec.steps) == list(range(step, 24))
    for s in range(step, 24):
        assert torch.equal(rec.steps[s][0], full_rec.steps[s][0])


def test_is_scoring_epoch_truth_table():
    epochs = range(8)
    assert [is_scoring_epoch(e, 1, 2) for e in epochs] == [False, True, False, True, False, True, False, True]
    assert [is_scoring_epoch(e, 1, None) for e in epochs] == [False, True] + [False] * 6
    assert [is_scoring_epoch(e, 0, 1) for e in epochs] == [True] * 8
    assert [is_scoring_epoch(e, 0, None) for e in epochs] == [True] + [False] * 7
    assert [is_scoring_epoch(e, 2, 3) for e in epochs] == [False, False, True, False, False, True, False, False]
    assert [is_scoring_epoch(e, 5, 1) for e in epochs] == [False] * 5 + [True] * 3
