"""`EnsembleModel`: m members behind one `nn.Module`, usable by the stock HF `Trainer`.

The ensemble output is the mean of the members' logits (paper Sec. 2) or, with ``reduction="probs"``,
the log of the mean softmax (the authors' released code). ``.loss`` is the SUM over members of each
member's mean loss, so ``loss.backward()`` gives every member exactly its own gradient.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.utils import ModelOutput

from .hub import EnsembleHubMixin
from .member_adapter import (
    MemberLoss,
    call_member,
    cross_entropy_per_sample,
    is_hf_model,
    mean_member_loss,
    member_input_names,
    model_inputs,
)
from .metrics import REDUCTIONS, reduce_member_logits


@dataclass
class EnsembleOutput(ModelOutput):
    """loss: scalar (sum of member mean losses) or None; logits: (B, C); member_logits: (B, m, C)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    member_logits: torch.Tensor | None = None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EnsembleModel(EnsembleHubMixin, nn.Module):
    """An ensemble of classifiers.

    Args:
        members: the member modules (HF ``PreTrainedModel``s called with the batch's model inputs, or plain
            modules called with the one tensor named ``input_name`` and returning logits ``(B, C)``).
        reduction: ``"logits"`` or ``"probs"`` (see :func:`reduce_member_logits`).
        input_name: batch column of a plain member's input.
        seeds: the seed each member was built with (recorded in saved configs).
        loss_fn: THE member loss, per-sample ``(logits (B, C), labels (B,)) -> (B,)`` (default cross-entropy):
            `SharpBalanceTrainer` trains (adding ``label_smoothing_factor`` to the default) and evaluates with it,
            and ``forward`` returns the sum over members of its batch mean. Not saved: pass it again after loading.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        reduction: str = "logits",
        input_name: str = "pixel_values",
        seeds: Sequence[int] | None = None,
        loss_fn: MemberLoss | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError(f"EnsembleModel.members must hold at least one module; got {len(members)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"EnsembleModel.reduction must be one of {REDUCTIONS}; got {reduction!r}")
        if seeds is not None and len(seeds) != len(members):
            raise ValueError(f"EnsembleModel.seeds must have one seed per member ({len(members)}); got {list(seeds)}")
        self.members = nn.ModuleList(members)
        self.reduction = reduction
        self.input_name = input_name
        self.seeds = list(seeds) if seeds is not None else None
        self.loss_fn: MemberLoss = loss_fn if loss_fn is not None else cross_entropy_per_sample

    @classmethod
    def from_factory(
        cls,
        factory: Callable[[int], nn.Module],
        num_members: int,
        seeds: Sequence[int] | None = None,
        **kwargs,
    ) -> EnsembleModel:
        """Build ``num_members`` members with ``factory(seed)``, each called right after seeding with ``seed``.

        ``seeds`` defaults to ``range(num_members)``; pass ``SharpBalanceConfig.member_seeds`` so a member's init
        matches its data and dropout streams.
        """
        seeds = list(range(num_members)) if seeds is None else list(seeds)
        if len(seeds) != num_members:
            raise ValueError(f"from_factory: seeds must have num_members={num_members} entries; got {seeds}")
        members = []
        for seed in seeds:
            seed_everything(seed)
            members.append(factory(seed))
        return cls(members, seeds=seeds, **kwargs)

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def main_input_name(self) -> str:
        """The batch column holding the inputs (the first HF member's ``main_input_name``, else ``input_name``)."""
        for member in self.members:
            if is_hf_model(member):
                return member.main_input_name
        return self.input_name

    def input_names(self) -> list[str]:
        """Batch columns the members consume (kept by the Trainer's ``remove_unused_columns``)."""
        names: list[str] = []
        for member in self.members:
            names += [n for n in member_input_names(member, self.input_name) if n not in names]
        return names

    def member_forward(self, index: int, batch: dict) -> torch.Tensor:
        """Logits ``(B, C)`` of member ``index`` on ``batch`` (extra columns ignored)."""
        member = self.members[index]
        return call_member(member, model_inputs(batch, member, self.input_name), self.input_name)

    def forward(self, labels: torch.Tensor | None = None, **inputs) -> EnsembleOutput:
        """Run every member on the batch.

        Returns ``EnsembleOutput`` with ``logits`` ``(B, C)``, ``member_logits`` ``(B, m, C)`` and, when
        ``labels`` ``(B,)`` is given, ``loss`` = sum over members of the batch mean of ``loss_fn`` (so that
        ``loss.backward()`` gives every member exactly its own gradient).
        """
        member_logits = torch.stack([self.member_forward(i, inputs) for i in range(self.num_members)], dim=1)
        loss = None
        if labels is not None:
            loss = sum(mean_member_loss(self.loss_fn, member_logits[:, i], labels) for i in range(self.num_members))
        return EnsembleOutput(
            loss=loss, logits=reduce_member_logits(member_logits, self.reduction), member_logits=member_logits
        )
