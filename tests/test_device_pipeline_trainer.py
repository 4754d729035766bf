"""The device-side image pipeline inside SharpBalanceTrainer: per-row seeds, resume and m-vs-1 equality stay exact."""

import pytest
import torch
from helpers import make_args, small_cnn
from transformers import default_data_collator

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.data import DeviceImagePipeline
from sbtrainer.sampling import TAG_AUGMENT, mix_seed

N, CLASSES = 20, 4


def _pipeline() -> tuple[DeviceImagePipeline, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    return DeviceImagePipeline(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), padding=2), labels


class Recorder:
    """Wraps the pipeline; records the seeds of every training call."""

    def __init__(self, pipe: DeviceImagePipeline) -> None:
        self.pipe, self.columns, self.seeds = pipe, pipe.columns, []

    def __call__(self, inputs, seeds):
        if seeds is not None:
            self.seeds.append(seeds.clone())
        return self.pipe(inputs, seeds)


def _trainer(tmp_path, transform, labels, pipe, seeds=(13, 17), **kw) -> SharpBalanceTrainer:
    args = make_args(tmp_path, num_members=len(seeds), member_seeds=list(seeds), **kw)
    model = EnsembleModel.from_factory(lambda _s: small_cnn(classes=CLASSES, dropout=0.2), len(seeds), args.member_seeds)
    return SharpBalanceTrainer(model=model, args=args, train_dataset=pipe.index_dataset(labels),
                               device_transform=transform, data_collator=default_data_collator)


def test_training_seeds_are_the_rows_stream_seeds(tmp_path):
    pipe, labels = _pipeline()
    rec = Recorder(pipe)
    trainer = _trainer(tmp_path, rec, labels, pipe, ensemble_method="deep_ensemble", num_train_epochs=2)
    trainer.train()
    sampler = trainer._member_sampler
    got = torch.cat(rec.seeds)
    want = []
    for epoch in range(2):
        for step in range(len(sampler)):
            for m, seed in enumerate((13, 17)):
                rows = sampler.member_rows(m, epoch, step)
                want += [mix_seed(seed, epoch, int(r), TAG_AUGMENT) for r in rows]
    assert got.tolist() == want


def test_member_of_an_ensemble_equals_a_one_member_run(tmp_path):
    pipe, labels = _pipeline()
    two = _trainer(tmp_path / "two", pipe, labels, pipe, seeds=(13, 17), ensemble_method="sam", num_train_epochs=2)
    two.train()
    one = _trainer(tmp_path / "one", pipe, labels, pipe, seeds=(17,), ensemble_method="sam", num_train_epochs=2)
    one.train()
    for a, b in zip(two.ensemble.members[1].state_dict().values(), one.ensemble.members[0].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("step", [3, 5, 8])  # mid-epoch before Td, the epoch boundary (Td), mid-epoch after
def test_resume_is_bitwise_equal(tmp_path, step):
    pipe, labels = _pipeline()
    kw = dict(ensemble_method="sharpbalance", num_train_epochs=2, scoring_start_epoch=1, sam_fraction=0.3,
              save_strategy="steps", save_steps=1)
    full = _trainer(tmp_path / "full", pipe, labels, pipe, **kw)
    full.train()
    resumed = _trainer(tmp_path / "resumed", pipe, labels, pipe, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
    for a, b in zip(resumed.ensemble.state_dict().values(), full.ensemble.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed.sam_masks, full.sam_masks)


def test_evaluation_and_scoring_use_the_clean_view(tmp_path):
    pipe, labels = _pipeline()
    trainer = _trainer(tmp_path, pipe, labels, pipe, ensemble_method="deep_ensemble", num_train_epochs=1)
    trainer.train()
    # Evaluation on the index dataset (gathered, normalised, no crop/flip) equals evaluation on the float view.
    clean = ((pipe.images.float() / 255 - torch.tensor(pipe.mean).view(1, 3, 1, 1))
             / torch.tensor(pipe.std).view(1, 3, 1, 1))
    floats = [{"pixel_values": clean[i], "labels": labels[i]} for i in range(N)]
    by_index = trainer.evaluate(pipe.index_dataset(labels))
    by_float = trainer.evaluate(floats)
    assert by_index["eval_loss"] == pytest.approx(by_float["eval_loss"], rel=1e-6)
    assert by_index["eval_ensemble_accuracy"] == by_float["eval_ensemble_accuracy"]
    scores_index = trainer.score_members(epoch=0)
    trainer.score_dataset = floats
    torch.testing.assert_close(trainer.score_members(epoch=0), scores_index, rtol=1e-5, atol=1e-7)
