"""`SharpBalanceConfig`: the `TrainingArguments` of an ensemble trained by `SharpBalanceTrainer`.

Every field names its range, its source in the paper (Lu et al., NeurIPS 2024, "Sharpness-Diversity
Tradeoff: Improving Flat Ensembles with SharpBalance") and its interactions. `__post_init__` rejects a
bad value with a `ValueError` that names the field, the rule and the value received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .scoring import SCORE_METHODS

ENSEMBLE_METHODS = ("deep_ensemble", "sam", "sharpbalance")
SELECTIONS = ("highest", "lowest")
RESIDUALS = ("none", "round_robin", "complement")
REDUCTIONS = ("logits", "probs")


def _invalid(name: str, rule: str, value: object) -> ValueError:
    return ValueError(f"SharpBalanceConfig.{name} {rule}; got {value!r}")


@dataclass
class SharpBalanceConfig(TrainingArguments):
    """Training arguments for an ensemble of ``num_members`` members.

    ``per_device_train_batch_size`` is the batch of ONE member: each optimizer step every member takes
    its own sub-batch of that size, in its own order (see `sbtrainer.sampling`).
    """

    ensemble_method: str = field(
        default="sharpbalance",
        metadata={
            "help": "'deep_ensemble' (plain loss on all data), 'sam' (SAM on all data, Foret et al. 2021) or "
            "'sharpbalance' (SAM on each member's sharpness-aware subset, plain loss on the rest; paper Sec. 4.3)."
        },
    )
    num_members: int = field(
        default=3, metadata={"help": "m, the number of members (>= 1; >= 2 for 'sharpbalance'). Paper: 3."}
    )
    member_seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Seed of each member: its init, data order, augmentation and dropout streams. "
            "Default [seed + i for i in range(num_members)]. Length must equal num_members."
        },
    )
    rho: float = field(
        default=0.05,
        metadata={"help": "SAM radius rho (>= 0). 0.05 is SAM's usual default; the paper's recipes use 0.2 (Table 1)."},
    )
    member_rhos: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-member rho (the paper's 'SAM+' baseline with different radii); overrides rho when set. "
            "Length must equal num_members, each >= 0."
        },
    )
    adaptive: bool = field(
        default=False,
        metadata={"help": "ASAM (Kwon et al. 2021): scale the perturbation by T = diag(|theta|)."},
    )
    sam_fraction: float = field(
        default=0.5,
        metadata={
            "help": "k in [0, 1]: each member's top fraction, floor(k*N) samples by per-sample sharpness, ties to "
            "the lower row index. Paper Table 1: 0.4 (CIFAR-10), 0.5 (CIFAR-100), 0.3 (TinyImageNet)."
        },
    )
    scoring_start_epoch: int | None = field(
        default=None,
        metadata={
            "help": "Td: epochs of SAM on all data before the first scoring (0 <= Td < num_train_epochs). "
            "Default: half of num_train_epochs. Paper: 100 of 200 (Table 1); App. D.3 text says 10 for CIFAR-10."
        },
    )
    rescore_every: int | None = field(
        default=None,
        metadata={"help": "None: score once at Td (the paper). N >= 1: re-score every N epochs after Td."},
    )
    selection: str = field(
        default="highest",
        metadata={
            "help": "'highest' (paper text: top-k sharpest samples) or 'lowest' (the authors' released code picks "
            "the k% lowest-Fisher samples)."
        },
    )
    residual: str = field(
        default="none",
        metadata={
            "help": "Samples in no member's top-k set (R, row order): 'none'; 'round_robin' adds R[i::m] to member "
            "i's SAM set (release, CIFAR-100); 'complement' adds R minus R[i::m] (release, CIFAR-10)."
        },
    )
    score_batch_size: int = field(
        default=64, metadata={"help": "Chunk size of the per-sample sharpness computation (>= 1)."}
    )
    score_method: str = field(
        default="auto",
        metadata={
            "help": "Per-sample gradient implementation: 'hooks' (one batched pass, plain Conv/Linear/BatchNorm "
            "modules), 'vmap' (torch.func, chunked), 'loop' (one sample at a time) or 'auto' (hooks, then vmap, "
            "then the loop)."
        },
    )
    ensemble_reduction: str = field(
        default="logits",
        metadata={"help": "'logits' (mean of logits, paper Sec. 2) or 'probs' (mean of softmax, the release)."},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Gradient clipping per member (0 = off). The paper's SGD does not clip."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choices()
        self._check_members()
        self._check_ranges()
        self._check_schedule()

    # -- validation ---------------------------------------------------------------------------------
    def _check_choices(self) -> None:
        for name, choices in (
            ("ensemble_method", ENSEMBLE_METHODS),
            ("selection", SELECTIONS),
            ("residual", RESIDUALS),
            ("ensemble_reduction", REDUCTIONS),
            ("score_method", SCORE_METHODS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise _invalid(name, f"must be one of {choices}", value)

    def _check_members(self) -> None:
        if not isinstance(self.num_members, int) or self.num_members < 1:
            raise _invalid("num_members", "must be an integer >= 1", self.num_members)
        if self.ensemble_method == "sharpbalance" and self.num_members < 2:
            raise _invalid("num_members", "must be >= 2 with ensemble_method='sharpbalance'", self.num_members)
        if self.member_seeds is None:
            self.member_seeds = [self.seed + i for i in range(self.num_members)]
        self.member_seeds = [int(s) for s in self.member_seeds]
        if len(self.member_seeds) != self.num_members:
            raise _invalid("member_seeds", f"must have num_members={self.num_members} entries", self.member_seeds)
        if self.member_rhos is not None:
            self.member_rhos = [float(r) for r in self.member_rhos]
            if len(self.member_rhos) != self.num_members:
                raise _invalid("member_rhos", f"must have num_members={self.num_members} entries", self.member_rhos)
            if any(r < 0 or not math.isfinite(r) for r in self.member_rhos):
                raise _invalid("member_rhos", "must all be finite and >= 0", self.member_rhos)

    def _check_ranges(self) -> None:
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise _invalid("rho", "must be finite and >= 0", self.rho)
        if not (0.0 <= self.sam_fraction <= 1.0):
            raise _invalid("sam_fraction", "must be in [0, 1]", self.sam_fraction)
        if self.score_batch_size < 1:
            raise _invalid("score_batch_size", "must be >= 1", self.score_batch_size)
        if self.rescore_every is not None and self.rescore_every < 1:
            raise _invalid("rescore_every", "must be None or an integer >= 1", self.rescore_every)
        if self.max_grad_norm < 0:
            raise _invalid("max_grad_norm", "must be >= 0 (0 turns clipping off)", self.max_grad_norm)

    def _check_schedule(self) -> None:
        epochs = math.ceil(self.num_train_epochs)
        if self.scoring_start_epoch is None:
            self.scoring_start_epoch = int(self.num_train_epochs // 2)
        if self.scoring_start_epoch < 0:
            raise _invalid("scoring_start_epoch", "must be >= 0", self.scoring_start_epoch)
        bounded_by_epochs = self.max_steps is None or self.max_steps <= 0
        if self.ensemble_method == "sharpbalance" and bounded_by_epochs and self.scoring_start_epoch >= epochs:
            raise _invalid(
                "scoring_start_epoch",
                f"must be < num_train_epochs={self.num_train_epochs} (scoring would never happen)",
                self.scoring_start_epoch,
            )

    # -- derived ------------------------------------------------------------------------------------
    def rho_of(self, member: int) -> float:
        """SAM radius of ``member`` (``member_rhos[member]`` when set, else ``rho``)."""
        return self.member_rhos[member] if self.member_rhos is not None else self.rho
