"""`Trainer.hyperparameter_search` (Optuna) over rho and k: each trial builds its own ensemble by `model_init`,
trains with its own values (derived fields re-derived) and starts with no masks carried over."""

import pytest
import torch
from helpers import make_args, mlp, vector_data
from transformers import TrainerCallback

from sbtrainer import EnsembleModel, SharpBalanceTrainer

optuna = pytest.importorskip("optuna", reason="hyperparameter_search(backend='optuna') needs optuna (dev extras)")


class Record(TrainerCallback):
    def __init__(self):
        self.seen, self.trainer = [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        t = self.trainer
        self.seen.append({"rho": args.rho, "sam_fraction": args.sam_fraction, "td": args.scoring_start_epoch,
                          "seeds": list(args.member_seeds), "model": id(model),
                          "clean": t.sam_masks is None and t.sample_scores is None and t.scoring_history == []})


def test_optuna_search_over_rho_and_k(tmp_path):
    args = make_args(tmp_path, ensemble_method="sharpbalance", num_members=2, num_train_epochs=2, sam_fraction=0.5,
                     rho=0.1, per_device_train_batch_size=4, eval_strategy="no")
    built = []

    def model_init(trial):
        ens = EnsembleModel.from_factory(lambda _s: mlp(), args.num_members, args.member_seeds)
        built.append(ens)
        return ens

    record = Record()
    trainer = SharpBalanceTrainer(args=args, model_init=model_init, train_dataset=vector_data(n=12),
                                  eval_dataset=vector_data(n=8, seed=3), callbacks=[record])
    record.trainer = trainer
    grid = [(0.05, 0.25), (0.2, 0.5), (0.3, 0.75)]

    def hp_space(trial):
        rho = trial.suggest_float("rho", 0.05, 0.3)
        return {"rho": rho, "sam_fraction": dict(grid)[rho], "num_train_epochs": 4}

    sampler = optuna.samplers.GridSampler({"rho": [g[0] for g in grid]})
    best = trainer.hyperparameter_search(backend="optuna", n_trials=3, direction="maximize", hp_space=hp_space,
                                         compute_objective=lambda m: m["eval_ensemble_accuracy"], sampler=sampler)
    assert len(record.seen) == 3
    assert sorted((s["rho"], s["sam_fraction"]) for s in record.seen) == grid  # each trial trains with its own ρ, k
    assert [s["td"] for s in record.seen] == [2, 2, 2]  # default Td re-derived from the trial's 4 epochs (was 1)
    assert all(s["seeds"] == [0, 1] for s in record.seen)  # seed 0 + i, re-derived
    assert len({s["model"] for s in record.seen}) == 3 and len(built) == 4  # one build at init + one per trial
    assert all(s["clean"] for s in record.seen)  # no masks, scores or history carried from one trial into the next
    assert best.hyperparameters["rho"] in [g[0] for g in grid]
    assert 0.0 <= best.objective <= 1.0
    assert torch.is_tensor(trainer.sam_masks) and trainer.sam_masks.shape == (2, 12)
