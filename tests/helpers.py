"""Shared tiny data and models for the tests: CPU only, no network, made in the test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn
from torch.utils.data import Dataset

from sbtrainer import EnsembleModel, SharpBalanceConfig, SharpBalanceTrainer


class DictDataset(Dataset):
    """Rows ``{"pixel_values": x[i], "labels": y[i]}``; optional crop(pad)+flip augmentation from torch's global RNG."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = False, pad: int = 2) -> None:
        self.x, self.y, self.augment, self.pad = x, y, augment, pad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        if self.augment:
            x = random_crop_flip(x, self.pad)
        return {"pixel_values": x, "labels": self.y[i]}


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding and a random horizontal flip of a (C, H, W) image (torch global RNG)."""
    _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    out = padded[:, top : top + h, left : left + w]
    return out.flip(-1) if torch.rand(()) < 0.5 else out


def image_data(n: int = 24, shape=(3, 8, 8), classes: int = 4, seed: int = 0, augment: bool = False) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g), augment)


def vector_data(n: int = 16, dim: int = 5, classes: int = 3, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g))


def mlp(dim: int = 5, classes: int = 3, hidden: int = 7, dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(dim, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


def small_cnn(classes: int = 4, dropout: float = 0.0, channels: int = 4, side: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(channels * side * side, classes),
    )


def make_args(tmp_path, **overrides) -> SharpBalanceConfig:
    """A config for exact tests: plain SGD, constant LR, no clipping, no logging integrations, CPU."""
    kw = dict(
        output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=4, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0,
    )
    kw.update(overrides)
    return SharpBalanceConfig(**kw)


def make_trainer(args: SharpBalanceConfig, build, train, **kwargs) -> SharpBalanceTrainer:
    """A trainer over an ensemble of ``build()`` members, each built right after seeding with its member seed."""
    model = EnsembleModel.from_factory(lambda _seed: build(), args.num_members, args.member_seeds)
    return SharpBalanceTrainer(model=model, args=args, train_dataset=train, **kwargs)


def member_params(trainer: SharpBalanceTrainer, i: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.ensemble.members[i].parameters()]


def tiny_albert_factory(dropout: float = 0.1):
    """A builder ``() -> AlbertForSequenceClassification`` of a 2-layer, 16-wide random ALBERT (shared layers)."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=20, num_labels=3, max_position_embeddings=32,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0, classifier_dropout_prob=dropout)
    return lambda: AlbertForSequenceClassification(config)


class TokenDataset(Dataset):
    """Rows with input_ids, attention_mask, token_type_ids and labels, for tiny transformer members."""

    def __init__(self, n: int = 20, length: int = 10, vocab: int = 40, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[: n // 2, length - 3 :] = 0  # some padding
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "token_type_ids": torch.zeros_like(self.ids[i]), "labels": self.y[i]}
