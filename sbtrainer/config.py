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

import logging
import math
from dataclasses import MISSING, dataclass, field, fields

from transformers import TrainingArguments

from .metrics import REDUCTIONS
from .partition import RESIDUALS, SELECTIONS
from .scoring import SCORE_METHODS

logger = logging.getLogger(__name__)

ENSEMBLE_METHODS = ("deep_ensemble", "sam", "sharpbalance")
ENSEMBLE_PARALLELISMS = ("data", "members")

# -- the audit of the inherited TrainingArguments fields ---------------------------------------------------
INHERITED_STATUSES = ("honoured", "refused", "partly refused", "no effect", "trainer-side")

_DDP_UNUSED = ("the DistributedDataParallel wrapper is dropped after `prepare`; gradients are combined by one "
               "all-reduce per optimizer step (the SAM ascent stays local to each process)")
_STOCK = "read by stock Trainer code that SharpBalanceTrainer does not override"
_HUB_PUSH = "honoured by `SharpBalanceTrainer.push_to_hub` (the ensemble format: config, card, `member_<i>/`)"

#: Every field of `transformers.TrainingArguments` (transformers 5.24) -> (status, why). A field that a new
#: transformers version adds must be audited and added here (tests/test_training_arguments.py checks it).
INHERITED_FIELDS: dict[str, tuple[str, str]] = {
    # training length, batch, optimizer, schedule
    "output_dir": ("honoured", "checkpoints, `sharpbalance_state.pt` and saved ensembles are written there"),
    "per_device_train_batch_size": ("honoured", "the batch of ONE member per step: each member takes its own "
                                    "sub-batch of this size in its own order (`sbtrainer.sampling`)"),
    "num_train_epochs": ("honoured", "also sets the default Td (`scoring_start_epoch` = half of it)"),
    "max_steps": ("honoured", "overrides `num_train_epochs` as in transformers"),
    "learning_rate": ("honoured", "one optimizer over all members' parameters; members never share a parameter"),
    "lr_scheduler_type": ("honoured", "the stock scheduler over the one optimizer (the same schedule for every "
                          "member)"),
    "lr_scheduler_kwargs": ("honoured", "passed to the stock scheduler"),
    "warmup_steps": ("honoured", "stock scheduler"),
    "optim": ("partly refused", "optimizers that only read `.grad` at `optimizer.step()` are honoured; refused: "
              "`lomo`/`adalomo` and the `*_layerwise` GaLore/APOLLO variants (they update weights inside "
              "`backward()`, so the SAM ascent pass would already step), and `schedule_free_*` (they need "
              "`optimizer.train()`/`.eval()` switches the SharpBalance step and scoring do not make)"),
    "optim_args": ("honoured", "passed to the optimizer (e.g. `momentum=0.9` for `sgd`)"),
    "weight_decay": ("honoured", "stock optimizer groups: biases and norm weights of every member are exempt"),
    "adam_beta1": ("honoured", "Adam-type optimizers"),
    "adam_beta2": ("honoured", "Adam-type optimizers"),
    "adam_epsilon": ("honoured", "Adam-type optimizers"),
    "optim_target_modules": ("honoured", "GaLore/APOLLO (non-layerwise) only; no effect with other optimizers"),
    "gradient_accumulation_steps": ("honoured", "each member's gradient is averaged over its rows of the "
                                    "accumulation window; the SAM perturbation is computed per micro-batch"),
    "average_tokens_across_devices": ("partly refused", "True (default) is what the trainer always does: each "
                                      "member's loss averages over that member's rows of the optimizer step across "
                                      "processes; False is refused"),
    "max_grad_norm": ("honoured", "redefined by SharpBalanceConfig: clips each member's gradient separately; the "
                      "default is 0 (off, as the paper's SGD)"),
    "label_smoothing_factor": ("honoured", "each member's training loss is label-smoothed cross-entropy, as "
                               "transformers applies it; `eval_loss` and per-sample scoring use plain cross-entropy"),
    # precision and speed
    "bf16": ("honoured", "bf16 autocast around each member's forward (also on CPU)"),
    "fp16": ("partly refused", "honoured on GPU (autocast and a GradScaler); refused on CPU, where accelerate makes "
             "neither an fp16 autocast nor a GradScaler, so training would silently run in float32 (use bf16)"),
    "bf16_full_eval": ("honoured", "stock: `evaluate()`/`predict()` outside `train()` cast the ensemble to bf16 "
                       "in place"),
    "fp16_full_eval": ("honoured", "stock: `evaluate()`/`predict()` outside `train()` cast the ensemble to fp16 "
                       "in place"),
    "tf32": ("honoured", "a global torch backend flag (CUDA Ampere+; transformers refuses it elsewhere)"),
    "activation_checkpointing": ("refused", "`EnsembleModel` has no `activation_checkpointing_enable`, and a "
                                 "forward recomputed in backward would update BatchNorm running statistics twice"),
    "activation_checkpointing_kwargs": ("no effect", "read only with `activation_checkpointing` (refused)"),
    "gradient_checkpointing": ("refused", "deprecated alias of `activation_checkpointing`"),
    "gradient_checkpointing_kwargs": ("no effect", "deprecated alias of `activation_checkpointing_kwargs`"),
    "torch_compile": ("refused", "accelerate compiles `EnsembleModel.forward`, which the training step never "
                      "calls (members are called one by one), so nothing would be compiled"),
    "torch_compile_backend": ("refused", "setting it turns `torch_compile` on"),
    "torch_compile_mode": ("refused", "setting it turns `torch_compile` on"),
    "use_liger_kernel": ("refused", "Liger patches a transformers model's modules and loss; the members' loss is "
                         "computed by the trainer"),
    "liger_kernel_config": ("no effect", "read only with `use_liger_kernel` (refused)"),
    "use_cache": ("no effect", "written to `model.config.use_cache`; `EnsembleModel` has no `config` (members keep "
                  "their own)"),
    "neftune_noise_alpha": ("refused", "NEFTune hooks the input embeddings of the model, and `EnsembleModel` has "
                            "none (`train()` would fail)"),
    "torch_empty_cache_steps": ("honoured", "the device cache is emptied every N optimizer steps after the step"),
    "auto_find_batch_size": ("refused", "the member batch is a hyper-parameter of the method (the paper's 128); "
                             "the per-member data loader does not read a reduced size"),
    # logging and experiment tracking
    "logging_strategy": ("honoured", "stock; training logs add `member_<i>_loss`, `_sam_batch_share`, "
                         "`_ascent_grad_norm`"),
    "logging_steps": ("honoured", _STOCK),
    "logging_first_step": ("honoured", _STOCK),
    "log_on_each_node": ("honoured", _STOCK),
    "logging_nan_inf_filter": ("honoured", "the logged training loss is filtered as in transformers; `eval_loss` "
                               "(recomputed from every row's member logits) averages the finite rows only"),
    "include_num_input_tokens_seen": ("honoured", "stock count over the whole step batch (the tokens of every "
                                      "member's sub-batch) of the `input_ids` column; other inputs are not counted "
                                      "(`EnsembleModel` has no `main_input_name`)"),
    "log_level": ("honoured", _STOCK),
    "log_level_replica": ("honoured", _STOCK),
    "disable_tqdm": ("honoured", "stock bars and the scoring bars"),
    "report_to": ("honoured", "stock integrations"),
    "run_name": ("honoured", "stock integrations"),
    "project": ("honoured", _STOCK + " (Trackio)"),
    "trackio_space_id": ("honoured", _STOCK + " (Trackio)"),
    "trackio_bucket_id": ("honoured", _STOCK + " (Trackio)"),
    "trackio_static_space_id": ("honoured", _STOCK + " (Trackio)"),
    # evaluation
    "eval_strategy": ("honoured", "stock schedule; one forward of the ensemble per batch gives the ensemble's and "
                      "every member's logits"),
    "eval_steps": ("honoured", _STOCK),
    "eval_delay": ("honoured", _STOCK),
    "per_device_eval_batch_size": ("honoured", "stock; every member sees the whole eval batch"),
    "prediction_loss_only": ("honoured", "only `eval_loss` (the mean over members of each member's mean "
                             "cross-entropy)"),
    "eval_on_start": ("honoured", _STOCK),
    "eval_do_concat_batches": ("partly refused", "False is refused: it hands per-batch lists to `compute_metrics`, "
                               "and the ensemble metrics and `eval_loss` need whole (N, m, C) arrays"),
    "eval_use_gather_object": ("honoured", "stock (only matters for non-tensor outputs)"),
    "eval_accumulation_steps": ("honoured", _STOCK),
    "include_for_metrics": ("honoured", "'loss' and 'inputs' (the ensemble's `main_input_name`)"),
    "batch_eval_metrics": ("honoured", "with your own `compute_metrics(eval_pred, compute_result)`; refused by "
                           "the trainer with the default ensemble metrics, which need every prediction at once"),
    # saving and the Hub
    "save_only_model": ("honoured", "stock (such checkpoints cannot be resumed; `sharpbalance_state.pt` is still "
                        "written)"),
    "save_strategy": ("honoured", "stock; every checkpoint also holds `sharpbalance_state.pt` (SAM masks, scores)"),
    "save_steps": ("honoured", _STOCK),
    "save_on_each_node": ("honoured", _STOCK),
    "save_total_limit": ("honoured", _STOCK),
    "enable_jit_checkpoint": ("honoured", "stock: the SIGTERM checkpoint goes through the SharpBalance "
                              "`_save_checkpoint`"),
    "push_to_hub": ("partly refused", "honoured with `hub_strategy='end'` (`trainer.push_to_hub()` / "
                    "`save_model()` upload the ensemble format); refused with the other strategies, whose checkpoint "
                    "pushes upload one flat state dict that `EnsembleModel.from_pretrained` cannot load"),
    "hub_token": ("honoured", _HUB_PUSH),
    "hub_private_repo": ("honoured", _HUB_PUSH),
    "hub_model_id": ("honoured", _HUB_PUSH),
    "hub_strategy": ("partly refused", "only 'end' (see `push_to_hub`)"),
    "hub_always_push": ("no effect", "only checkpoint pushes read it, and those are refused"),
    "hub_revision": ("refused", "`SharpBalanceTrainer.push_to_hub` uploads to the repo's default branch"),
    "load_best_model_at_end": ("honoured", "the best checkpoint's weights are loaded into the ensemble (strictly)"),
    "metric_for_best_model": ("honoured", "any evaluation metric: `loss`, `ensemble_accuracy`, `ensemble_nll`, ..."),
    "greater_is_better": ("honoured", _STOCK),
    "ignore_data_skip": ("honoured", "on resume the current epoch restarts at its first step (same per-member "
                         "orders), as in transformers"),
    "restore_callback_states_from_checkpoint": ("honoured", "stock (the scoring callback keeps its state in "
                                                "`sharpbalance_state.pt`, restored on every resume)"),
    # reproducibility and devices
    "full_determinism": ("honoured", "stock `enable_full_determinism(seed)`"),
    "seed": ("honoured", "the default `member_seeds` are `seed + i`; also seeds scoring-time transforms"),
    "data_seed": ("refused", "each member's data order comes from its `member_seeds` entry "
                  "(sbtrainer.sampling); `data_seed` would change nothing"),
    "use_cpu": ("honoured", "stock device selection (with `fp16`: refused, see `fp16`)"),
    "accelerator_config": ("partly refused", "honoured, except `split_batches=True` and `dispatch_batches=True`, "
                           "which would split a step's member sub-batches across processes"),
    "parallelism_config": ("refused", "tensor/context/sequence parallelism and sharded data parallelism split "
                           "members across processes; the trainer averages whole-member gradients with one "
                           "all-reduce"),
    # data loading
    "dataloader_drop_last": ("honoured", "drops each member's last incomplete sub-batch"),
    "dataloader_num_workers": ("honoured", "training and evaluation loaders"),
    "dataloader_pin_memory": ("honoured", "training and evaluation loaders"),
    "dataloader_persistent_workers": ("honoured", "training and evaluation loaders"),
    "dataloader_prefetch_factor": ("honoured", "training and evaluation loaders"),
    "dataloader_multiprocessing_context": ("honoured", "training and evaluation loaders"),
    "dataloader_in_order": ("honoured", "training and evaluation loaders"),
    "remove_unused_columns": ("honoured", "keeps the members' inputs, the label and the index columns"),
    "label_names": ("partly refused", "one name is honoured (that column is read as the labels in training, "
                    "scoring and evaluation); none or several names are refused (a classifier has one label column)"),
    "train_sampling_strategy": ("partly refused", "only 'random': each member draws its own random order from its "
                                "seed"),
    "length_column_name": ("no effect", "read only by the length-grouped samplers (refused)"),
    # distributed
    "ddp_find_unused_parameters": ("no effect", _DDP_UNUSED),
    "ddp_bucket_cap_mb": ("no effect", _DDP_UNUSED),
    "ddp_broadcast_buffers": ("no effect", _DDP_UNUSED + "; process 0 keeps its own buffers, as with DDP's "
                              "broadcast"),
    "ddp_static_graph": ("no effect", _DDP_UNUSED),
    "ddp_backend": ("honoured", "the process group's backend"),
    "ddp_timeout": ("honoured", "the process group's timeout"),
    "fsdp": ("refused", "FSDP shards members and owns the gradient reduction; the SharpBalance step needs whole "
             "members on every process"),
    "fsdp_config": ("no effect", "read only with `fsdp` (refused)"),
    "deepspeed": ("refused", "DeepSpeed owns the backward, the optimizer step and the gradient reduction, which "
                  "the SharpBalance step does itself"),
    "debug": ("honoured", "stock (`underflow_overflow` hooks every member's modules)"),
    "skip_memory_metrics": ("honoured", _STOCK),
    # script flags
    "do_train": ("no effect", "not read by the Trainer (a flag for scripts), as in transformers"),
    "do_eval": ("no effect", "not read by the Trainer (a flag for scripts), as in transformers"),
    "do_predict": ("no effect", "not read by the Trainer (a flag for scripts), as in transformers"),
    "resume_from_checkpoint": ("no effect", "not read by the Trainer; pass it to `train(resume_from_checkpoint=)`"),
    "local_rank": ("no effect", "launcher compatibility; the rank comes from the environment"),
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
            cannot honour (see `INHERITED_FIELDS`); or a combination that would silently make the chosen
            method another one (e.g. ``ensemble_method='sam'`` with ``rho=0`` is a deep ensemble).
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

    def _check_method_combinations(self, scoring_start_given: bool) -> None:
        """Refuse combinations that silently ignore a SAM option; warn once when an explicit value makes the
        chosen method another one, or a field is never read.

        Refused: 'deep_ensemble' with ``member_rhos`` or ``adaptive`` (SAM variants of a method without SAM).
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
        for name, methods in _METHOD_ONLY_FIELDS.items():
            given = scoring_start_given if name == "scoring_start_epoch" else getattr(self, name) != defaults[name]
            if method not in methods and given:
                _warn_once(f"SharpBalanceConfig.{name}={getattr(self, name)!r} is read only by ensemble_method "
                           f"{' and '.join(repr(m) for m in methods)}; it has no effect with {method!r}.")

    # -- derived ------------------------------------------------------------------------------------
    def rho_of(self, member: int) -> float:
        """SAM radius of ``member`` (``member_rhos[member]`` when set, else ``rho``)."""
        return self.member_rhos[member] if self.member_rhos is not None else self.rho
