"""`SharpBalanceConfig`: the `TrainingArguments` of an ensemble trained by `SharpBalanceTrainer`.

Every field names its range, its source in the paper (Lu et al., NeurIPS 2024, "Sharpness-Diversity
Tradeoff: Improving Flat Ensembles with SharpBalance") and its interactions. `__post_init__` rejects a
bad value with a `ValueError` that names the field, the rule and the value received.

Every field inherited from `transformers.TrainingArguments` is audited in `INHERITED_FIELDS`: it is
honoured (works as the transformers docs describe), refused here when the config is built (a
`ValueError` naming the field and why), or has no effect (and why). Combinations of this class's own
fields that would silently turn the chosen method into another one are refused too.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources

from transformers import TrainingArguments

from .metrics import REDUCTIONS
from .partition import RESIDUALS, SELECTIONS
from .sam import SAM_VARIANTS
from .scoring import SCORE_METHODS

logger = logging.getLogger(__name__)

ENSEMBLE_METHODS = ("deep_ensemble", "sam", "sharpbalance")
ENSEMBLE_PARALLELISMS = ("data", "members")

# -- the audit of the inherited TrainingArguments fields ---------------------------------------------------
INHERITED_STATUSES = ("honoured", "refused", "partly refused", "no effect", "trainer-side")


#: Every field of `transformers.TrainingArguments` (transformers 5.24) -> (status, why), kept as data in
#: `inherited_fields.json` beside this module. A field that a new transformers version adds must be audited and
#: added there (tests/test_training_arguments.py checks it).
INHERITED_FIELDS: dict[str, tuple[str, str]] = {
    name: (row["status"], row["why"])
    for name, row in json.loads(resources.files(__package__).joinpath("inherited_fields.json").read_text()).items()
}


def inherited_fields_markdown() -> str:
    """The audit as a Markdown table (field | status | why); fields with the same status and reason share a row."""
    order = {status: i for i, status in enumerate(("refused", "partly refused", "trainer-side", "no effect",
                                                    "honoured"))}
    groups: dict[tuple[str, str], list[str]] = {}
    for name, key in INHERITED_FIELDS.items():
        groups.setdefault(key, []).append(name)
    rows = sorted(groups.items(), key=lambda kv: order[kv[0][0]])
    lines = ["| field | status | why |", "|---|---|---|"]
    lines += [f"| {', '.join(f'`{n}`' for n in names)} | {status} | {why} |" for (status, why), names in rows]
    return "\n".join(lines) + "\n"


_LOMO_OPTIMIZERS = ("lomo", "adalomo")
_LAYERWISE_OPTIMIZERS = ("galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
                         "apollo_adamw_layerwise")
_SCHEDULE_FREE_OPTIMIZERS = ("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd")

# Fields read only by some methods: (field, methods that read it). Set to a non-default value with another
# method they are ignored, and a warning says so once.
_METHOD_ONLY_FIELDS = {
    "rho": ("sam", "sharpbalance"),
    "sam_fraction": ("sharpbalance",),
    "selection": ("sharpbalance",),
    "residual": ("sharpbalance",),
    "score_batch_size": ("sharpbalance",),
    "score_method": ("sharpbalance",),
    "rescore_every": ("sharpbalance",),
    "scoring_start_epoch": ("sharpbalance",),
}
_warned: set[str] = set()


def _invalid(name: str, rule: str, value: object) -> ValueError:
    return ValueError(f"SharpBalanceConfig.{name} {rule}; got {value!r}")


def _unsupported(name: str, why: str, value: object) -> ValueError:
    return ValueError(f"SharpBalanceConfig.{name} is not supported: {why}; got {value!r}")


def _plain(value: object) -> object:
    """The string of an enum member (transformers' `OptimizerNames`, `HubStrategy`, ...), other values as they are."""
    return getattr(value, "value", value)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@dataclass
class SharpBalanceConfig(TrainingArguments):
    """Training arguments for an ensemble of ``num_members`` members.

    ``per_device_train_batch_size`` is the batch of ONE member: each optimizer step every member takes
    its own sub-batch of that size, in its own order (see `sbtrainer.sampling`).

    Raises:
        ValueError: a field out of range; an inherited `TrainingArguments` field that `SharpBalanceTrainer`
            cannot honour (see `INHERITED_FIELDS`); or a combination that silently ignores a SAM option
            (``member_rhos``/``adaptive``/``sam_variant='gsam'`` with ``deep_ensemble``). Explicit limits that make
            the method another one exactly (``rho=0``: a deep ensemble; ``sam_fraction=1``: SAM;
            ``gsam_alpha=0`` with GSAM: SAM) are accepted with a warning.
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
        metadata={
            "help": "SAM radius rho (>= 0; 'sam' and 'sharpbalance' only, and rho = 0 with them is refused: it is "
            "a deep ensemble). 0.05 is SAM's usual default; the paper's recipes use 0.2 (Table 1)."
        },
    )
    member_rhos: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-member rho (the paper's 'SAM+' baseline with different radii); overrides rho when set. "
            "Length must equal num_members, each >= 0, not all 0. Not with 'deep_ensemble'."
        },
    )
    adaptive: bool = field(
        default=False,
        metadata={
            "help": "ASAM (Kwon et al. 2021): scale the perturbation by T = diag(|theta|). Not with 'deep_ensemble'."
        },
    )
    sam_variant: str = field(
        default="sam",
        metadata={
            "help": "The descent rule of every SAM step: 'sam' (the gradient at theta + eps) or 'gsam' (Zhuang et al., "
            "ICLR 2022: g_p - gsam_alpha * g_perp, g_p the gradient at theta + eps, g_perp the part of the gradient "
            "at theta orthogonal to g_p; same cost as SAM). ASAM stays adaptive=True, so GSAM + ASAM is allowed. "
            "With 'sharpbalance' GSAM replaces SAM on each member's SAM set only (paper App. F, Table 7: "
            "'SharpBalance (GSAM)'); 'sam' with 'gsam' is the paper's 'Deep Ensemble + GSAM'. Not with "
            "'deep_ensemble'."
        },
    )
    gsam_alpha: float = field(
        default=0.01,
        metadata={
            "help": "GSAM's alpha (finite, >= 0; read only with sam_variant='gsam'; 0 is SAM exactly). The GSAM paper "
            "tunes alpha per model and reports it for ImageNet only (its appendix hyper-parameter table: 0.01 for "
            "ResNet50 and ResNet101); it gives no value for ResNets on CIFAR, nor does the SharpBalance paper (App. "
            "F, Table 7), so 0.01 here is our choice, carried over from its ResNets. The radius is constant (rho); "
            "the GSAM paper's rho schedule tied to the learning rate is not implemented."
        },
    )
    moving_average_start_step: int | None = field(
        default=None,
        metadata={
            "help": "EoA, Ensemble of Averages (Arpit et al., NeurIPS 2022): None = off. An integer t0 >= 0: each "
            "member keeps the equal-weight (simple) moving average of its weights after every optimizer step t >= "
            "t0 (t = 0 is the initial weights, t = k the weights after k updates, the Trainer's global_step); "
            "BatchNorm statistics of the averaged members are recomputed on the training data at the end. "
            "Evaluation during training uses the live weights; the final evaluation, save and push use the averages. "
            "Works with every ensemble_method; must be <= max_steps when max_steps > 0."
        },
    )
    sam_fraction: float = field(
        default=0.5,
        metadata={
            "help": "k in [0, 1]: each member's top fraction, floor(k*N) samples by per-sample sharpness, ties to "
            "the lower row index. Paper Table 1: 0.4 (CIFAR-10), 0.5 (CIFAR-100), 0.3 (TinyImageNet). With "
            "'sharpbalance', k = 1 (that is 'sam') and k = 0 with residual 'none' (scores never used) are refused."
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
            "help": "'highest' (paper text: the top-k sharpest samples) or 'lowest' (the authors' released code "
            "picks the fraction k of samples with the lowest Fisher trace)."
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
            "help": "Per-sample gradient implementation, all exact: 'hooks' (one batched pass, plain "
            "Conv/Linear/BatchNorm modules), 'ghost' (one batched pass, transformer members: HF BERT/ALBERT, timm "
            "ViT), 'vmap' (torch.func, chunked), 'loop' (one sample at a time) or 'auto' (hooks, ghost, vmap, then "
            "the loop; each refuses by the model's structure what it cannot compute exactly)."
        },
    )
    ensemble_parallelism: str = field(
        default="data",
        metadata={
            "help": "How W processes share the work. 'data': every process trains every member on its own "
            "sub-batches, so one optimizer step uses W * per_device_train_batch_size * gradient_accumulation_steps "
            "rows per member (W processes equal one process with accumulation W). 'members': process r trains "
            "members {i : i mod W = r} (W <= num_members), each exactly as in a 1-process run "
            "(per_device_train_batch_size rows per member per step, no gradient communication): the paper's "
            "setting of one member per GPU."
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
        # What the user gave, so that derived values can be derived again (`rederive`).
        self._given = {"scoring_start_epoch": self.scoring_start_epoch is not None,
                       "member_seeds": self.member_seeds is not None}
        self._check_inherited()  # before transformers resolves aliases, compile defaults and plugins
        super().__post_init__()
        self._check_inherited_resolved()
        self._check_own_fields()

    def _check_own_fields(self) -> None:
        self._check_choices()
        self._check_members()
        self._check_ranges()
        self._check_schedule()
        self._check_method_combinations(self._given["scoring_start_epoch"])

    def rederive(self) -> None:
        """Validate the SharpBalance fields again and derive the defaults again from the current values.

        For fields set after construction, e.g. by `Trainer.hyperparameter_search`, which sets attributes
        without running ``__post_init__``: ``member_seeds`` (``seed + i``) and ``scoring_start_epoch`` (half of
        ``num_train_epochs``) are derived again unless the user gave them; ``member_rhos``, when given,
        still overrides ``rho``.

        Raises:
            ValueError: as the constructor.
        """
        if not self._given["member_seeds"]:
            self.member_seeds = None
        if not self._given["scoring_start_epoch"]:
            self.scoring_start_epoch = None
        self._check_own_fields()

    # -- validation of the inherited fields ------------------------------------------------------------
    def _check_inherited(self) -> None:
        """Refuse the inherited fields `SharpBalanceTrainer` cannot honour (see `INHERITED_FIELDS`), as given."""
        if self.parallelism_config is not None:
            raise _unsupported("parallelism_config", INHERITED_FIELDS["parallelism_config"][1],
                               self.parallelism_config)
        if self.deepspeed:
            raise _unsupported("deepspeed", INHERITED_FIELDS["deepspeed"][1], self.deepspeed)
        if self.fsdp:
            raise _unsupported("fsdp", INHERITED_FIELDS["fsdp"][1], self.fsdp)
        for name in ("torch_compile", "torch_compile_backend", "torch_compile_mode"):
            if getattr(self, name):
                raise _unsupported(name, INHERITED_FIELDS["torch_compile"][1], getattr(self, name))
        for name in ("activation_checkpointing", "gradient_checkpointing"):
            if getattr(self, name, False):  # activation_checkpointing is no TrainingArguments field in 5.17
                raise _unsupported(name, INHERITED_FIELDS["activation_checkpointing"][1], getattr(self, name))
        for name in ("neftune_noise_alpha", "use_liger_kernel", "auto_find_batch_size"):
            if getattr(self, name):
                raise _unsupported(name, INHERITED_FIELDS[name][1], getattr(self, name))
        if not self.average_tokens_across_devices:
            raise _unsupported("average_tokens_across_devices", "each member's loss always averages over that "
                               "member's rows of the optimizer step across processes (the True behaviour)",
                               self.average_tokens_across_devices)
        if _plain(self.train_sampling_strategy) != "random":
            raise _unsupported("train_sampling_strategy", "members take their own per-member random orders from "
                               "member_seeds (sbtrainer.sampling); only 'random' is honoured",
                               _plain(self.train_sampling_strategy))
        if self.data_seed is not None:
            raise _unsupported("data_seed", INHERITED_FIELDS["data_seed"][1], self.data_seed)
        if not self.eval_do_concat_batches:
            raise _unsupported("eval_do_concat_batches", INHERITED_FIELDS["eval_do_concat_batches"][1],
                               self.eval_do_concat_batches)
        self._check_optimizer()
        if self.push_to_hub and _plain(self.hub_strategy) != "end":
            raise _unsupported("push_to_hub", f"with hub_strategy={_plain(self.hub_strategy)!r} every checkpoint "
                               "pushes the Trainer's flat state dict of the whole ensemble, which "
                               "EnsembleModel.from_pretrained cannot load; set hub_strategy='end' and call "
                               "trainer.push_to_hub() (or save_model()) to push the ensemble format",
                               self.push_to_hub)
        if self.hub_revision is not None:
            raise _unsupported("hub_revision", "SharpBalanceTrainer.push_to_hub uploads to the repo's default "
                               "branch (EnsembleModel.push_to_hub takes no revision)", self.hub_revision)
        if self.label_names is not None and len(self.label_names) != 1:
            raise _invalid("label_names", "must name exactly one label column (the class index of each row)",
                           self.label_names)

    def _check_optimizer(self) -> None:
        optim = _plain(self.optim)
        if optim in _LOMO_OPTIMIZERS:
            raise _unsupported("optim", "LOMO optimizers update the weights inside backward(), so the SAM ascent "
                               "pass would already step, and they need the learning rate passed to backward()",
                               optim)
        if optim in _LAYERWISE_OPTIMIZERS:
            raise _unsupported("optim", "layer-wise optimizers step each parameter inside backward() (a hook), so "
                               "the SAM ascent pass would already step and clipping and accumulation never see "
                               "the gradient; use the non-layerwise variant", optim)
        if optim in _SCHEDULE_FREE_OPTIMIZERS:
            raise _unsupported("optim", "schedule-free optimizers need optimizer.train()/.eval() switches that the "
                               "SharpBalance training step and scoring do not make", optim)

    def _check_inherited_resolved(self) -> None:
        """Refusals that need what `TrainingArguments.__post_init__` resolved (device, precision, plugins)."""
        if self.deepspeed_plugin is not None:  # e.g. ACCELERATE_USE_DEEPSPEED=true from `accelerate launch`
            raise _unsupported("deepspeed", INHERITED_FIELDS["deepspeed"][1] + " (enabled by the accelerate "
                               "environment)", self.deepspeed)
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            source = "fp16=True" if self.fp16 else "ACCELERATE_MIXED_PRECISION='fp16'"
            raise ValueError(
                "SharpBalanceConfig.fp16 is not supported on CPU (use_cpu=True, or no accelerator found): accelerate "
                "makes neither an fp16 autocast nor a GradScaler there, so training would silently run in float32; "
                f"use bf16=True, which works on CPU; got {source}, use_cpu={self.use_cpu!r}")
        acc = self.accelerator_config
        for key in ("split_batches", "dispatch_batches"):
            if getattr(acc, key, None):
                raise _unsupported("accelerator_config", f"{key}=True would split a step's member sub-batches "
                                   "across processes; each process must hold whole member sub-batches",
                                   {key: getattr(acc, key)})

    # -- validation of this class's fields --------------------------------------------------------------
    def _check_choices(self) -> None:
        for name, choices in (
            ("ensemble_method", ENSEMBLE_METHODS),
            ("ensemble_parallelism", ENSEMBLE_PARALLELISMS),
            ("selection", SELECTIONS),
            ("residual", RESIDUALS),
            ("ensemble_reduction", REDUCTIONS),
            ("score_method", SCORE_METHODS),
            ("sam_variant", SAM_VARIANTS),
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
        if isinstance(self.gsam_alpha, bool) or not (self.gsam_alpha >= 0 and math.isfinite(self.gsam_alpha)):
            raise _invalid("gsam_alpha", "must be finite and >= 0", self.gsam_alpha)
        start = self.moving_average_start_step
        if start is not None:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise _invalid("moving_average_start_step", "must be None (off) or an integer >= 0", start)
            if self.max_steps is not None and self.max_steps > 0 and start > self.max_steps:
                raise _invalid("moving_average_start_step", f"must be <= max_steps={self.max_steps} (the average "
                               "would never receive a weight)", start)

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

    def _check_method_combinations(self, scoring_start_given: bool) -> None:
        """Refuse combinations that silently ignore a SAM option; warn once when an explicit value makes the
        chosen method another one, or a field is never read.

        Refused: 'deep_ensemble' with ``member_rhos``, ``adaptive`` or ``sam_variant='gsam'`` (SAM variants of a
        method without SAM). Warned: ``gsam_alpha`` set with ``sam_variant='sam'`` (never read), and
        ``gsam_alpha=0`` with ``'gsam'`` (SAM exactly).
        Warned (explicit limits, exact by construction and used by the equivalence tests): 'sam'/'sharpbalance'
        with every radius 0 (a deep ensemble), 'sharpbalance' with ``sam_fraction=1`` ('sam') or
        ``sam_fraction=0`` with ``residual='none'`` (the plain loss after Td). A ``sam_fraction`` that selects
        no row of the training set, ``floor(k N) = 0`` with ``k > 0``, is refused by the trainer.
        """
        method = self.ensemble_method
        if method == "deep_ensemble":
            if self.member_rhos is not None:
                raise _invalid("member_rhos", "is used only by ensemble_method 'sam' and 'sharpbalance' (a deep "
                               "ensemble takes no SAM step); use ensemble_method='sam' for SAM with per-member radii",
                               self.member_rhos)
            if self.adaptive:
                raise _invalid("adaptive", "is used only by ensemble_method 'sam' and 'sharpbalance' (a deep "
                               "ensemble takes no SAM step)", self.adaptive)
            if self.sam_variant != "sam":
                raise _invalid("sam_variant", "is used only by ensemble_method 'sam' and 'sharpbalance' (a deep "
                               "ensemble takes no SAM step); 'Deep Ensemble + GSAM' is ensemble_method='sam' with "
                               "sam_variant='gsam'", self.sam_variant)
        else:
            radii = self.member_rhos if self.member_rhos is not None else [self.rho]
            if all(r == 0.0 for r in radii):
                name = "member_rhos" if self.member_rhos is not None else "rho"
                _warn_once(f"SharpBalanceConfig.{name}={getattr(self, name)!r} with ensemble_method={method!r}: with "
                           "radius 0 every SAM step is the plain step, i.e. this run is a deep ensemble (exactly).")
        if method == "sharpbalance":
            if self.sam_fraction == 1.0:
                _warn_once("SharpBalanceConfig.sam_fraction=1.0 with ensemble_method='sharpbalance': every member's "
                           "SAM set is every row, i.e. this run is ensemble_method='sam' (plus the cost of scoring).")
            if self.sam_fraction == 0.0 and self.residual == "none":
                _warn_once("SharpBalanceConfig.sam_fraction=0.0 with ensemble_method='sharpbalance' and residual='none': "
                           "every SAM set is empty after scoring (SAM before Td, the plain loss after).")
        defaults = {f.name: f.default for f in fields(SharpBalanceConfig) if f.default is not MISSING}
        if self.sam_variant != "gsam" and self.gsam_alpha != defaults["gsam_alpha"]:
            _warn_once(f"SharpBalanceConfig.gsam_alpha={self.gsam_alpha!r} is read only with sam_variant='gsam'; it "
                       f"has no effect with sam_variant={self.sam_variant!r}.")
        if self.sam_variant == "gsam" and self.gsam_alpha == 0.0 and method != "deep_ensemble":
            _warn_once("SharpBalanceConfig.gsam_alpha=0.0 with sam_variant='gsam': the GSAM correction is zero, i.e. "
                       "this run is sam_variant='sam' (exactly).")
        for name, methods in _METHOD_ONLY_FIELDS.items():
            given = scoring_start_given if name == "scoring_start_epoch" else getattr(self, name) != defaults[name]
            if method not in methods and given:
                _warn_once(f"SharpBalanceConfig.{name}={getattr(self, name)!r} is read only by ensemble_method "
                           f"{' and '.join(repr(m) for m in methods)}; it has no effect with {method!r}.")

    # -- derived ------------------------------------------------------------------------------------
    def rho_of(self, member: int) -> float:
        """SAM radius of ``member`` (``member_rhos[member]`` when set, else ``rho``)."""
        return self.member_rhos[member] if self.member_rhos is not None else self.rho
