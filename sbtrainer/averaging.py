"""EoA — Ensemble of Averages (Arpit et al., NeurIPS 2022): a simple moving average of each member's weights.

Each member keeps an equal-weight running average of its parameters over the optimizer steps from a
start step on (`torch.optim.swa_utils.AveragedModel` with its default average, ``use_buffers=False``);
at the end the averaged member's BatchNorm statistics are recomputed on the training data
(`torch.optim.swa_utils.update_bn`), and the averages replace the live weights. No Trainer knowledge here:
`SharpBalanceTrainer` calls :meth:`MemberAverages.update` after every optimizer step and
:meth:`MemberAverages.finalize` at the end of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from .member_adapter import call_member


class _OnBatch(nn.Module):
    """``member`` called on a dict batch, so `update_bn` (which calls ``model(batch)``) can drive any member."""

    def __init__(self, member: nn.Module, input_name: str) -> None:
        super().__init__()
        self.member = member
        self.input_name = input_name

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return call_member(self.member, batch, self.input_name)


class MemberAverages:
    """One `AveragedModel` per member: ``theta_bar_i = mean_{t >= start} theta_i(t)``.

    Args:
        members: the live members (their parameters are averaged, not modified until `copy_into`).
        start_step: ``t0``: the weights after optimizer step ``t`` enter the average for every ``t >= t0``
            (``t`` the ``Trainer.state.global_step`` after the step; ``t = 0`` the initial weights).
        owned: the members this process trains (their averages are updated); default all.

    Raises:
        ValueError: ``start_step < 0``.
    """

    def __init__(self, members: Sequence[nn.Module], start_step: int, owned: Iterable[int] | None = None) -> None:
        if start_step < 0:
            raise ValueError(f"MemberAverages: start_step must be >= 0; got {start_step}")
        self.start_step = int(start_step)
        self.owned = list(range(len(members))) if owned is None else list(owned)
        self.averages = [AveragedModel(m, use_buffers=False) for m in members]

    def update(self, members: Sequence[nn.Module], step: int) -> bool:
        """Add the weights after optimizer step ``step`` (when ``step >= start_step``); True if added."""
        if step < self.start_step:
            return False
        for i in self.owned:
            self.averages[i].update_parameters(members[i])
        return True

    @property
    def num_averaged(self) -> list[int]:
        """Steps in each member's average."""
        return [int(a.n_averaged) for a in self.averages]

    def recompute_batchnorm(self, batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
                            input_name: str = "pixel_values") -> None:
        """`update_bn` on each averaged member over ``batches()`` (dict batches on the members' device).

        BatchNorm running statistics are reset and re-estimated as a cumulative average over one pass
        (momentum None), the member in train mode, no gradients. Members without BatchNorm are unchanged.
        """
        for avg in self.averages:
            with torch.no_grad():
                update_bn(batches(), _OnBatch(avg.module, input_name))

    def copy_into(self, members: Sequence[nn.Module]) -> None:
        """Replace each live member's parameters and buffers by its average's (a copy, in place)."""
        for avg, member in zip(self.averages, members, strict=True):
            with torch.no_grad():
                for dst, src in zip(member.parameters(), avg.module.parameters(), strict=True):
                    dst.copy_(src)
                for dst, src in zip(member.buffers(), avg.module.buffers(), strict=True):
                    dst.copy_(src)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"member_<i>": AveragedModel.state_dict()}`` (the averaged weights and ``n_averaged``)."""
        return {f"member_{i}": a.state_dict() for i, a in enumerate(self.averages)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore what :meth:`state_dict` returned (bitwise).

        Raises:
            ValueError: the state holds a different number of members.
        """
        if len(state) != len(self.averages):
            raise ValueError(f"MemberAverages: the saved state has {len(state)} members; this ensemble has "
                             f"{len(self.averages)}")
        for i, a in enumerate(self.averages):
            a.load_state_dict(state[f"member_{i}"])
