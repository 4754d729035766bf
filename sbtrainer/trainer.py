"""`SharpBalanceTrainer`: one HF `Trainer` that trains an m-member ensemble by deep ensemble, SAM or SharpBalance.

Per optimizer step every member ``i`` takes its own sub-batch ``B`` (`sbtrainer.sampling`), split into
``S = B ∩ D_i^SAM`` and ``N = B \\ S``, and leaves in ``.grad`` (paper Sec. 4.3, Algorithm 1)::

    g = (|S|/|B|) ∇L_S(θ + ε_S) + (|N|/|B|) ∇L_N(θ),    ε_S = ρ ∇L_S(θ) / ‖∇L_S(θ)‖

``deep_ensemble`` has ``S = ∅``; ``sam`` has ``S = B``; ``sharpbalance`` uses ``S = B`` before the first
scoring (epochs ``[0, Td)``) and the installed masks after. The Trainer's own loop then clips (per
member), steps the optimizer and the scheduler. Members never share a gradient. With gradient
accumulation every row of a member's window weighs ``1 / (that member's rows in the window)``,
whatever the micro-batch sizes; with several processes each process adds its rows' share and the
gradients are summed by one all-reduce per optimizer step (the ascent gradient stays local, as in
m-sharpness). The logged ``loss`` and ``eval_loss`` are the mean over members of each member's mean
loss (``member_i_loss`` for each member).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator

import safetensors.torch
import torch
import torch.distributed as dist
from accelerate.utils.memory import clear_device_cache
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, default_data_collator
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput
from transformers.utils import SAFE_WEIGHTS_NAME

from .averaging import MemberAverages
from .config import SharpBalanceConfig
from .ensemble import EnsembleModel
from .member_adapter import (
    INDEX_KEYS,
    LABEL_KEYS,
    MemberLoss,
    batch_labels,
    cross_entropy_per_sample,
    mean_member_loss,
)
from .partition import partition_statistics, sam_sets, top_k_masks
from .sam import select_rows, single_sample_norm_eval, subset_sam_step
from .sampling import (
    TAG_AUGMENT,
    TAG_DROPOUT,
    MemberBatchSampler,
    MemberStreamDataset,
    SeededRowsDataset,
    mix_seed,
)
from .scoring import is_scoring_epoch, score_members

logger = logging.getLogger(__name__)

STATE_NAME = "sharpbalance_state.pt"
AVERAGES_NAME = "moving_average.pt"


# Private `transformers.Trainer` methods this trainer overrides or calls. They are not public API: each is
# checked at import, so a transformers release that renames one fails here with a clear message instead of
# silently skipping an override. Verified on transformers 5.17 (the GPU machines) and 5.24.
TRAINER_HOOKS_OVERRIDDEN = (
    "_run_epoch", "_prepare_for_training", "_get_num_items_in_batch", "_save", "_load_from_checkpoint",
    "_load_best_model", "_save_checkpoint", "_load_optimizer_and_scheduler", "_clip_grad_norm", "_get_grad_norm",
    "_set_signature_columns_if_needed",
)
TRAINER_HOOKS_CALLED = (
    "_prepare_inputs", "_remove_unused_columns", "_get_collator_with_removed_columns", "_get_output_dir",
    "autocast_smart_context_manager",
)


def _check_trainer_hooks() -> None:
    import transformers

    missing = [n for n in TRAINER_HOOKS_OVERRIDDEN + TRAINER_HOOKS_CALLED if not callable(getattr(Trainer, n, None))]
    if missing:
        raise ImportError(
            f"sbtrainer needs the transformers.Trainer methods {missing}, which transformers {transformers.__version__} "
            "does not have; install a transformers version sbtrainer supports (see pyproject.toml).")


_check_trainer_hooks()


class _StepLog:
    """Per-member training statistics accumulated on device between two logging steps (no host syncs).

    Losses are sums over rows, so a window of micro-batches of unequal sizes gives the per-row mean.
    """

    def __init__(self, num_members: int) -> None:
        self.m = num_members
        self.reset()

    def reset(self) -> None:
        self.loss_sum = [0.0] * self.m
        self.rows = [0] * self.m
        self.sam_rows = [0] * self.m
        self.ascent_norm = [0.0] * self.m
        self.ascents = [0] * self.m
        self.skipped = 0
        self.skipped_steps = 0

    def add(self, i: int, mean_loss: torch.Tensor, rows: int, sam_rows: int, norm: torch.Tensor | None) -> None:
        """Record member i's sub-batch: its mean loss over ``rows`` rows, ``sam_rows`` of them under SAM."""
        self.loss_sum[i] = self.loss_sum[i] + mean_loss.detach().float() * rows
        self.rows[i] += rows
        self.sam_rows[i] += sam_rows
        if norm is not None:
            self.ascent_norm[i] = self.ascent_norm[i] + norm.detach().float()
            self.ascents[i] += 1
            self.skipped = self.skipped + (~torch.isfinite(norm)).int()

    def all_reduce(self, steps_per_process: bool) -> None:
        """Sum the statistics over processes (members mode: each member's only on its owner; data mode: its rows)."""
        vals = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in
                self.loss_sum + self.rows + self.sam_rows + self.ascent_norm + self.ascents + [self.skipped, self.skipped_steps]]
        device = next((v.device for v in self.loss_sum if torch.is_tensor(v)), torch.device("cpu"))
        flat = torch.stack([v.to(device) for v in vals])
        if dist.get_backend() == "nccl" and flat.device.type != "cuda":
            flat = flat.cuda()
        dist.all_reduce(flat)
        flat = flat.cpu().tolist()
        m = self.m
        self.loss_sum, self.rows, self.sam_rows = flat[:m], [int(r) for r in flat[m:2 * m]], [int(r) for r in flat[2 * m:3 * m]]
        self.ascent_norm, self.ascents = flat[3 * m:4 * m], [int(a) for a in flat[4 * m:5 * m]]
        # data mode: every process skips the same steps (one all-reduced gradient); members mode: each its own
        steps = int(flat[5 * m + 1])
        self.skipped, self.skipped_steps = int(flat[5 * m]), steps if steps_per_process else steps // dist.get_world_size()

    def drain(self) -> dict[str, float]:
        """Per-row means since the last drain, as floats; resets."""
        if not any(self.rows):
            return {}
        out: dict[str, float] = {}
        for i in range(self.m):
            if self.rows[i]:
                out[f"member_{i}_loss"] = float(self.loss_sum[i]) / self.rows[i]
                out[f"member_{i}_sam_batch_share"] = self.sam_rows[i] / self.rows[i]
            if self.ascents[i]:
                out[f"member_{i}_ascent_grad_norm"] = float(self.ascent_norm[i]) / self.ascents[i]
        out["skipped_ascents"] = float(self.skipped)
        out["skipped_optimizer_steps"] = float(self.skipped_steps)
        self.reset()
        return out


class SharpBalanceTrainer(Trainer):
    """A `transformers.Trainer` for `EnsembleModel`s configured by `SharpBalanceConfig`.

    Args:
        model: the ensemble.
        args: the config.
        model_init: (keyword) ``() -> EnsembleModel`` or ``(trial) -> EnsembleModel`` instead of ``model``, as for
            `Trainer.hyperparameter_search`: every trial builds its own ensemble, re-derives the config's derived
            fields for the trial's values and starts with no masks, scores or scoring history.
        score_dataset: the training set's eval-time view (same rows, no augmentation) used for per-sample
            sharpness; defaults to ``train_dataset`` itself.
        score_loss_fn: the per-sample loss whose squared gradient norm is a row's sharpness score; default the
            per-sample NLL (the empirical Fisher trace, paper Sec. 4.3), whatever the member loss.
        device_transform: ``(inputs, seeds) -> inputs``, applied to every batch once it is on the device
            (training, evaluation, prediction, scoring), e.g. `sbtrainer.data.DeviceImagePipeline`. ``seeds``
            is the ``(B,)`` int64 CPU tensor of the rows' augmentation seeds ``mix_seed(member_seed, epoch, row,
            TAG_AUGMENT)`` (`sbtrainer.sampling`) in training, the same seeds the CPU path draws a row's
            augmentation under, so per-member streams, resume and m-vs-1 equality stay exact; ``None`` elsewhere
            (the clean view). Its ``columns`` attribute (if any) names dataset columns it reads, kept when
            unused columns are removed.
        **kwargs: every other `Trainer` argument (datasets, collator, callbacks, optimizers, ...).

    The member loss is the ensemble's ``loss_fn`` (`EnsembleModel`, default per-sample cross-entropy):
    training takes its mean over each member's sub-batch (with ``label_smoothing_factor`` added to the
    default), evaluation reports its mean as ``eval_loss``.

    Raises:
        TypeError: ``model`` is not an `EnsembleModel` or ``args`` not a `SharpBalanceConfig`.
        ValueError: an option this trainer refuses (see the README's audit of `TrainingArguments`), a
            SharpBalance run that cannot select any row, a dataset transform whose columns would be dropped.
    """

    def __init__(self, model: EnsembleModel | None = None, args: SharpBalanceConfig | None = None, score_dataset=None,
                 score_loss_fn: MemberLoss | None = None,
                 device_transform: Callable[[dict, torch.Tensor | None], dict] | None = None, **kwargs) -> None:
        model_init = kwargs.pop("model_init", None)
        if model is None and model_init is not None:  # built once here; each trial of a search builds its own
            from transformers.trainer_utils import number_of_arguments

            model = model_init() if number_of_arguments(model_init) == 0 else model_init(None)
        _check_inputs(model, args, kwargs.get("train_dataset"), score_dataset)
        _check_transform_columns(args, train_dataset=kwargs.get("train_dataset"), eval_dataset=kwargs.get("eval_dataset"),
                                 score_dataset=score_dataset)
        _set_reduction(model, args)
        default_metrics = kwargs.get("compute_metrics") is None
        if default_metrics:
            kwargs["compute_metrics"] = self._default_compute_metrics
        # The stock Trainer builds a LabelSmoother by reading `model.config` (an EnsembleModel has none);
        # the member loss applies label_smoothing_factor itself (`_loss`), so hide it from the stock init.
        smoothing = args.label_smoothing_factor
        args.label_smoothing_factor = 0.0
        try:
            super().__init__(model=model, args=args, **kwargs)
        finally:
            args.label_smoothing_factor = smoothing
        _check_trainer_args(self, kwargs, default_metrics)
        self.model_init = model_init
        self.model_accepts_loss_kwargs = False  # EnsembleModel.forward(**inputs) does not scale for num_items_in_batch
        self._label_column = _label_column(args)
        self.score_loss_fn: MemberLoss = score_loss_fn if score_loss_fn is not None else cross_entropy_per_sample
        self._train_loss_fn = _training_loss(model, args)
        self.score_dataset = score_dataset
        if device_transform is not None and callable(getattr(device_transform, "to", None)):
            device_transform = device_transform.to(self.args.device)  # e.g. a pipeline's image store
        self.device_transform = device_transform
        self.sam_masks: torch.Tensor | None = None
        self.sample_scores: torch.Tensor | None = None
        self.last_scored_epoch: int | None = None
        self.scoring_history: list[dict] = []
        self._step_log = _StepLog(model.num_members)
        self._micro = (-1, -1)  # (global_step, micro-step index) of the last training_step
        self._update_steps_per_epoch: int | None = None
        self._masks_by_hand = False
        self._skip_checked_step = 0
        self.owned_members = _owned_members(model.num_members, args, self.accelerator.num_processes,
                                            self.accelerator.process_index)
        self._check_sam_fraction()
        self.member_averages: MemberAverages | None = None
        _check_averaging(args, self.accelerator.num_processes)
        if args.moving_average_start_step is not None:
            self.add_callback(_AverageAfterStep(self))

    # -- hyper-parameter search ----------------------------------------------------------------------
    def _hp_search_setup(self, trial) -> None:
        """The stock set-up (sets the trial's values on ``args``), then the config derived again, state reset."""
        super()._hp_search_setup(trial)
        if trial is None or self.hp_search_backend is None:  # a plain train(): the stock set-up did nothing
            return
        self.args.rederive()
        self._reset_scoring_state()

    def _reset_scoring_state(self) -> None:
        self.sam_masks = self.sample_scores = self.last_scored_epoch = None
        self.scoring_history = []
        self._masks_by_hand = False

    def call_model_init(self, trial=None) -> EnsembleModel:
        """The stock ``model_init`` call, with the new ensemble checked and given the config's reduction."""
        model = super().call_model_init(trial)
        self._reset_scoring_state()  # the masks and scores belong to the previous ensemble
        _check_inputs(model, self.args, self.train_dataset, self.score_dataset)
        _set_reduction(model, self.args)
        self._train_loss_fn = _training_loss(model, self.args)
        self._step_log = _StepLog(model.num_members)
        self.owned_members = _owned_members(model.num_members, self.args, self.accelerator.num_processes,
                                            self.accelerator.process_index)
        self._check_sam_fraction()
        return model

    def _default_compute_metrics(self, eval_pred) -> dict[str, float]:
        """`sbtrainer.metrics.ensemble_metrics` with the ensemble's own reduction (read at call time)."""
        from .metrics import make_compute_metrics

        return make_compute_metrics(reduction=self.ensemble.reduction)(eval_pred)

    def _check_sam_fraction(self) -> None:
        """Refuse a SharpBalance run whose top-k sets are empty: ``floor(k N) = 0`` with ``k > 0``.

        No member would ever train with SAM after Td (``sam_fraction=0`` asks for that explicitly).
        """
        args = self.args
        if args.ensemble_method != "sharpbalance" or args.residual != "none" or args.sam_fraction == 0:
            return
        rows = self._train_rows()
        if rows is not None and math.floor(args.sam_fraction * rows) == 0:
            raise ValueError(
                f"SharpBalanceConfig.sam_fraction={args.sam_fraction} selects floor(k N) = 0 of the {rows} training rows: "
                "every SAM set would be empty, so after scoring_start_epoch the run would be a deep ensemble. "
                f"Use sam_fraction >= {1 / rows:.4g} (or sam_fraction=0 to ask for that).")

    def train(self, *args, **kwargs):
        """`Trainer.train`, after refusing a SharpBalance run that would end before its first scoring.

        Afterwards every process holds the whole trained ensemble (members mode included).
        """
        self._check_schedule()
        self._warn_small_last_batch()
        output = super().train(*args, **kwargs)
        self._synchronize()
        if self.member_averages is not None:
            self._install_averages()
        return output

    def _install_averages(self) -> None:
        """EoA's end of training: BatchNorm statistics of each averaged member recomputed, averages installed.

        `update_bn` runs over the training rows' clean view (``score_dataset``, or the training set with any
        random transform fixed per row), batch ``per_device_eval_batch_size``; every process sees every row.
        """
        if min(self.member_averages.num_averaged) == 0:
            logger.warning("moving_average_start_step=%d was never reached (%d optimizer steps): the live weights "
                           "are kept.", self.args.moving_average_start_step, self.state.global_step)
            self.member_averages = None
            return
        dataset, collate_fn = self.scoring_data(self.current_epoch())
        collate = collate_fn if collate_fn is not None else default_data_collator
        size, device = self.args.per_device_eval_batch_size, self.args.device

        def batches():
            for lo in range(0, len(dataset), size):
                rows = list(range(lo, min(lo + size, len(dataset))))
                getitems = getattr(dataset, "__getitems__", None)
                examples = getitems(rows) if getitems is not None else [dataset[r] for r in rows]
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples).items()}
                yield self._clean_view(batch)

        self.member_averages.recompute_batchnorm(batches, self.ensemble.input_name)
        self.member_averages.copy_into(self.ensemble.members)
        logger.info("Installed the moving averages of %s optimizer steps per member.",
                    self.member_averages.num_averaged)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (call it on every process), the ensemble synchronised first."""
        self._synchronize()
        super().save_model(output_dir, _internal_call)

    def _train_rows(self) -> int | None:
        """Rows of the training dataset, or None without one or when it has no length (an iterable dataset)."""
        try:
            return None if self.train_dataset is None else len(self.train_dataset)
        except TypeError:
            return None

    def _warn_small_last_batch(self) -> None:
        """Warn when each epoch ends on a sub-batch of under a quarter of the batch and members have BatchNorm.

        Such a batch normalises with the statistics of a handful of rows, every epoch. Measured on real
        CIFAR-10 (900 rows, batch 64, so a 4-row last batch; width-8 ResNet18, SGD 0.1, 40 epochs, SAM
        ρ 0.01, one seed): training accuracy 76.9% against 97.2% with ``dataloader_drop_last=True``
        (recipes/studies/cifar10_cpu.py, README "Results at small scale").
        """
        args, rows = self.args, self._train_rows()
        batch = args.per_device_train_batch_size
        last = 0 if rows is None else rows % batch
        if args.dataloader_drop_last or not 0 < last < batch / 4 or not any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.ensemble.members[0].modules()):
            return
        logger.warning(
            "Each epoch ends on a batch of %d of %d rows (%d training rows) and the members have BatchNorm: that "
            "batch is normalised with the statistics of %d rows every epoch, which can slow fitting badly (measured: "
            "76.9%% vs 97.2%% training accuracy, sbtrainer.trainer._warn_small_last_batch). Set "
            "dataloader_drop_last=True or change the batch size or the row count.", last, batch, rows, last)

    @contextlib.contextmanager
    def _every_row(self) -> Iterator[None]:
        """``dataloader_drop_last`` off while an evaluation or prediction loader is built (HF drops eval rows too)."""
        drop = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.args.dataloader_drop_last = drop

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """`Trainer.get_eval_dataloader`, keeping every row: ``dataloader_drop_last`` applies to training only.

        transformers applies it to evaluation as well, which would leave the last ``N mod B`` rows out of
        every ensemble metric (and all of them when ``N < B``).
        """
        with self._every_row():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """`Trainer.get_test_dataloader` (``predict``), keeping every row (see `get_eval_dataloader`)."""
        with self._every_row():
            return super().get_test_dataloader(test_dataset)

    def _check_schedule(self) -> None:
        """Refuse a SharpBalance run that would end before its first scoring (a SAM run under another name).

        Checked when training starts, since masks installed by hand (`set_sam_masks`) make such a run
        legitimate; the steps per epoch are ``ceil(ceil(N / B) / W / accumulation)``.
        """
        args = self.args
        rows = self._train_rows()
        if args.ensemble_method != "sharpbalance" or rows is None or args.max_steps <= 0 or self._masks_by_hand:
            return
        batches = rows // args.per_device_train_batch_size if args.dataloader_drop_last else math.ceil(
            rows / args.per_device_train_batch_size)
        per_process = math.ceil(batches / self.accelerator.num_processes) if self._data_mode else batches
        steps_per_epoch = max(math.ceil(per_process / args.gradient_accumulation_steps), 1)
        first_scoring_step = args.scoring_start_epoch * steps_per_epoch
        if first_scoring_step >= args.max_steps:
            raise ValueError(
                f"SharpBalanceConfig.scoring_start_epoch={args.scoring_start_epoch} with max_steps={args.max_steps}: "
                f"scoring would start at step {first_scoring_step} ({steps_per_epoch} optimizer steps per epoch), after "
                "the last step, so the run would be SAM on all data labelled 'sharpbalance'. Lower scoring_start_epoch "
                "or raise max_steps (or use ensemble_method='sam').")

    # -- properties and public state ----------------------------------------------------------------
    @property
    def ensemble(self) -> EnsembleModel:
        return self.accelerator.unwrap_model(self.model)

    def current_epoch(self) -> int:
        """The integer epoch the next training step belongs to (as the Trainer computes it on resume)."""
        if self._update_steps_per_epoch is None:
            return 0
        return int(self.state.global_step // self._update_steps_per_epoch)

    def set_sam_masks(self, masks: torch.Tensor) -> None:
        """Install SAM masks ``(m, len(train_dataset))`` bool by hand; used until the next scheduled scoring."""
        if self.args.ensemble_method != "sharpbalance":
            raise ValueError(
                f"set_sam_masks: SAM masks are used only with ensemble_method='sharpbalance'; got {self.args.ensemble_method!r}")
        expected = (self.ensemble.num_members, len(self.train_dataset))
        if masks.dtype != torch.bool or tuple(masks.shape) != expected:
            raise ValueError(f"set_sam_masks: masks must be a bool tensor of shape {expected}; "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        self.sam_masks = masks.detach().cpu().clone()
        self._masks_by_hand = True

    def install_scores(self, scores: torch.Tensor, masks: torch.Tensor, epoch: int) -> None:
        """Record a scoring's scores ``(m, N)`` and masks ``(m, N)`` made at the start of ``epoch``."""
        self.set_sam_masks(masks)
        self._masks_by_hand = False
        self.sample_scores = scores.detach().float().cpu().clone()
        self.last_scored_epoch = epoch
        self.scoring_history.append({"epoch": epoch, "global_step": self.state.global_step})

    def scoring_data(self, epoch: int) -> tuple:
        """The dataset and collator per-sample scoring iterates at ``epoch`` (unused columns removed).

        ``score_dataset`` (the eval view) when given; otherwise the training set with any random
        transform fixed by the seed ``(seed, epoch, row)``, so scores are reproducible.
        """
        if self.score_dataset is not None:
            dataset, collate_fn = self._with_model_columns(self.score_dataset, "scoring")
        else:
            dataset, collate_fn = self._with_model_columns(self.train_dataset, "scoring")
            dataset = SeededRowsDataset(dataset, mix_seed(self.args.seed, epoch))
        if self._label_column is None:
            return dataset, collate_fn
        collate = collate_fn if collate_fn is not None else default_data_collator
        return dataset, lambda rows: self._standard_labels(collate(rows))

    # -- data ---------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # The ensemble's forward(**inputs) names no inputs: keep the members' inputs, labels and index columns.
        if self._signature_columns is None:
            self._signature_columns = self.ensemble.input_names() + list(LABEL_KEYS) + list(INDEX_KEYS)
            self._signature_columns += list(getattr(self.device_transform, "columns", ()))
            self._signature_columns += [n for n in self.label_names if n not in self._signature_columns]

    def _with_model_columns(self, dataset, description: str) -> tuple:
        try:
            import datasets as hf_datasets  # lazy: the lent GPU machines have no `datasets`
        except ImportError:
            hf_datasets = None
        if hf_datasets is not None and isinstance(dataset, hf_datasets.Dataset):
            return self._remove_unused_columns(dataset, description=description), self.data_collator
        return dataset, self._get_collator_with_removed_columns(self.data_collator, description=description)

    def get_train_dataloader(self) -> DataLoader:
        """One batch per step holding every member's sub-batch, tagged with sample_index and member_index."""
        if self.train_dataset is None:
            raise ValueError("SharpBalanceTrainer: training requires a train_dataset.")
        args = self.args
        dataset, collate_fn = self._with_model_columns(self.train_dataset, "training")
        self._member_sampler = MemberBatchSampler(
            len(dataset), args.per_device_train_batch_size, args.member_seeds, drop_last=args.dataloader_drop_last)
        batch_sampler = self._member_sampler if self._data_mode else _OwnedMembers(self._member_sampler, self.owned_members)
        params = {"batch_sampler": batch_sampler, "collate_fn": collate_fn,
                  "num_workers": args.dataloader_num_workers, "pin_memory": args.dataloader_pin_memory}
        if args.dataloader_num_workers > 0:
            params.update(persistent_workers=args.dataloader_persistent_workers,
                          prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
                          multiprocessing_context=args.dataloader_multiprocessing_context)
        loader = DataLoader(MemberStreamDataset(dataset, args.member_seeds), **params)
        if self._data_mode:  # shard whole steps across processes; in members mode each process reads its members' rows
            loader = self.accelerator.prepare(loader)
        steps = len(loader)
        ga = args.gradient_accumulation_steps
        self._update_steps_per_epoch = max(steps // ga + int(steps % ga > 0), 1)
        return loader

    def _run_epoch(self, *args, **kwargs):
        # The per-member order depends on the epoch; set it on the sampler we own, whatever wraps it.
        epoch = kwargs["epoch"]
        self._member_sampler.set_epoch(epoch)
        self._maybe_score(epoch)
        return super()._run_epoch(*args, **kwargs)

    # -- scoring: when, across processes, installing the partition -------------------------------------
    def _maybe_score(self, epoch: int) -> None:
        """Score at the start of epoch Td and every ``rescore_every`` epochs after (once per epoch, resume included).

        Scoring at Td itself, not one epoch late as in the authors' release.
        """
        args = self.args
        if args.ensemble_method != "sharpbalance" or self.last_scored_epoch == epoch:
            return
        if is_scoring_epoch(epoch, args.scoring_start_epoch, args.rescore_every):
            self.score_and_install(epoch)

    def score_and_install(self, epoch: int) -> None:
        """Score every member on every training row, partition, install masks and scores, log statistics."""
        args = self.args
        scores = self.score_members(epoch)
        top = top_k_masks(scores, args.sam_fraction, args.selection)
        masks = sam_sets(top, args.residual)
        self.install_scores(scores, masks, epoch)
        self.log(partition_statistics(scores, top, masks))
        logger.info("Scored %d members on %d rows at epoch %d.", scores.shape[0], scores.shape[1], epoch)

    def score_members(self, epoch: int) -> torch.Tensor:
        """Scores ``(m, N)`` float32 on CPU; process r scores rows ``[r N / W, (r + 1) N / W)``, then a sum-reduce."""
        acc, args = self.accelerator, self.args
        ensemble = self.ensemble
        self._synchronize()
        dataset, collate_fn = self.scoring_data(epoch)
        n, world, rank = len(dataset), acc.num_processes, acc.process_index
        lo, hi = rank * n // world, (rank + 1) * n // world
        scores = torch.zeros(ensemble.num_members, n, device=acc.device)
        scores[:, lo:hi] = score_members(
            list(ensemble.members), dataset, rows=range(lo, hi), collate_fn=collate_fn,
            batch_size=args.score_batch_size, method=args.score_method, input_name=ensemble.input_name,
            loss_fn=self.score_loss_fn, device=acc.device, progress=acc.is_local_main_process and not args.disable_tqdm,
            desc=f"scoring {ensemble.num_members} members", prepare=self._clean_view).to(acc.device)
        if world > 1:
            scores = acc.reduce(scores, reduction="sum")
        return scores.float().cpu()

    def _prepare_for_training(self, *args, **kwargs):
        """Prepare as the stock Trainer does, then drop the DistributedDataParallel wrapper it built.

        Gradients are summed by one flat all-reduce per optimizer step (`_all_reduce_sum_grads`):
        the SAM ascent must stay local to each process, so DDP's reducer would never be used. Keeping
        the wrapper would cost a gradient-sized bucket copy per process and keep the process group
        referenced by an object that is only freed at interpreter shutdown, where Gloo can abort
        (SIGABRT) after a successful run. DDP's construction already broadcast rank 0's weights.
        """
        if self.args.moving_average_start_step is not None:  # before a resume loads the saved averages
            self.member_averages = MemberAverages(self.ensemble.members, self.args.moving_average_start_step,
                                                  self.owned_members)
        model, loader = super()._prepare_for_training(*args, **kwargs)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
            self.model_wrapped = model
        if self.member_averages is not None and self.state.global_step == 0:  # t = 0: the initial weights
            self.member_averages.update(self.ensemble.members, 0)
        return model, loader

    # -- the step -----------------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Rows of each member in one accumulation window: int64 ``(m,)`` on the CPU, summed over processes.

        Every row of a member's window then weighs ``1 / count`` in its gradient and in the logged loss,
        whatever the micro-batch sizes (the stock count would be None here, since the ensemble does not
        take loss kwargs, and would count all members' labels together).
        """
        if not batch_samples or "member_index" not in batch_samples[0]:
            return None
        m = self.ensemble.num_members
        counts = sum(torch.bincount(b["member_index"].reshape(-1).cpu(), minlength=m) for b in batch_samples)
        if self.accelerator.num_processes > 1 and self._data_mode:  # one collective (and host copy) per window
            total = counts.to(device)
            dist.all_reduce(total)
            counts = total.cpu()
        return counts  # on the CPU: training_step reads the counts without a device sync per micro-step

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """Forward/backward of every member on its sub-batch; ``.grad`` holds the final gradient.

        ``num_items_in_batch`` is the ``(m,)`` count of each member's rows in the accumulation window
        (all processes); member i's gradient is the sum of its per-row gradients divided by that count.
        Returns the detached contribution of this micro-batch to the logged loss, which is
        the mean over members of each member's mean loss over the window.
        """
        ensemble = self.ensemble
        ensemble.train()
        sample_index = inputs.pop("sample_index").cpu()
        member_index = inputs.pop("member_index").cpu()
        inputs = self._prepare_inputs(self._standard_labels(inputs))
        if self.device_transform is not None:
            inputs = self.device_transform(inputs, self._augment_seeds(member_index, sample_index))
        if num_items_in_batch is None:  # called outside the training loop: this micro-batch is the window
            world = self.accelerator.num_processes
            num_items_in_batch = torch.bincount(member_index, minlength=ensemble.num_members) * (
                world if self._data_mode else 1)
        counts = [int(c) for c in num_items_in_batch]
        micro = self._next_micro_step()
        if micro == 0:
            self._count_skipped_step()
        total = torch.zeros((), device=self.args.device)
        for i in range(ensemble.num_members):
            rows = torch.nonzero(member_index == i).squeeze(1)
            if rows.numel() == 0:  # a member with no rows in this micro-batch (a custom sampler)
                continue
            batch = select_rows(inputs, rows, len(member_index), self.args.device)
            sam_mask = self._sam_mask(i, sample_index[rows])
            with self._member_rng(i, micro):
                loss = self._member_step(i, batch, sam_mask, 1.0 / counts[i])
            total = total + loss * (rows.numel() / counts[i])
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients and self._data_mode:
            _all_reduce_sum_grads(ensemble)
        every = self.args.torch_empty_cache_steps
        if every is not None and every > 0 and self.state.global_step % every == 0:
            clear_device_cache()
        # The stock loop averages the logged loss over processes; each process holds its share of the sum.
        return total.detach() * (self.accelerator.num_processes / ensemble.num_members)

    def _augment_seeds(self, member_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int64: each row's augmentation seed, the one `MemberStreamDataset` fetches it under."""
        seeds, epoch = self.args.member_seeds, self._member_sampler.epoch
        return torch.tensor([mix_seed(seeds[m], epoch, r, TAG_AUGMENT)
                             for m, r in zip(member_index.tolist(), sample_index.tolist(), strict=True)],
                            dtype=torch.int64)

    def _clean_view(self, inputs: dict) -> dict:
        return inputs if self.device_transform is None else self.device_transform(inputs, None)

    def _count_skipped_step(self) -> None:
        """Count the last optimizer step if the loss scaler skipped it (inf/NaN gradients), once per step."""
        step = self.state.global_step
        if step > 0 and self._skip_checked_step != step:
            self._skip_checked_step = step
            if self.accelerator.optimizer_step_was_skipped:
                self._step_log.skipped_steps += 1

    def _member_step(self, i: int, batch: dict, sam_mask: torch.Tensor, row_weight: float) -> torch.Tensor:
        """Add member i's gradient of ``row_weight * sum of its per-row losses`` to ``.grad``; return the mean loss at θ.

        ``sam_mask`` bool ``(B,)`` splits the sub-batch into S (SAM objective) and N (plain loss);
        the step itself is `sbtrainer.sam.subset_sam_step`.
        """
        result = subset_sam_step(
            self.ensemble.members[i], lambda sub, rows: self._loss(i, sub, rows), batch, sam_mask,
            self.args.rho_of(i), row_weight=row_weight, adaptive=self.args.adaptive, device=self.args.device,
            backward=self._backward, unscale=self._unscaled, autocast=self.accelerator.autocast,
            variant=self.args.sam_variant, gsam_alpha=self.args.gsam_alpha)
        self._step_log.add(i, result.loss, int(sam_mask.numel()), result.sam_rows, result.ascent_norm)
        return result.loss

    def _loss(self, i: int, batch: dict, size: int) -> torch.Tensor:
        """Mean member loss of member i on ``batch`` (norm layers on running statistics for a 1-row batch)."""
        labels = batch_labels(batch)
        member = self.ensemble.members[i]
        ctx = single_sample_norm_eval(member) if size == 1 else contextlib.nullcontext()
        with ctx:
            logits = self.ensemble.member_forward(i, batch)
        return mean_member_loss(self._train_loss_fn, logits, labels)

    def _backward(self, loss: torch.Tensor) -> None:
        # Not accelerator.backward: it also divides by its own accumulation steps; we scale explicitly.
        scaler = self.accelerator.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _unscaled(self, value: torch.Tensor) -> torch.Tensor:
        """A gradient quantity read between a loss-scaled backward and the unscale, divided by the scale.

        `GradScaler.unscale_` may run only once per optimizer step, so quantities read before it are
        divided by the current scale instead (on device, no host sync).
        """
        scaler = self.accelerator.scaler
        if scaler is None or not scaler.is_enabled():
            return value
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler.get_scale()
        return value / (scale.to(value.device) if torch.is_tensor(scale) else scale)

    def _standard_labels(self, inputs: dict) -> dict:
        """Rename the configured label column (``label_names=[name]``) to ``labels``."""
        key = self._label_column
        if key is not None and key in inputs and "labels" not in inputs:
            inputs = dict(inputs)
            inputs["labels"] = inputs.pop(key)
        return inputs

    def _sam_mask(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """Bool ``(B,)``: which of member i's rows take the SAM objective this step."""
        method = self.args.ensemble_method
        if method == "deep_ensemble":
            return torch.zeros(rows.numel(), dtype=torch.bool)
        if method == "sam" or self.sam_masks is None:
            return torch.ones(rows.numel(), dtype=torch.bool)
        return self.sam_masks[i, rows]

    def _next_micro_step(self) -> int:
        step, micro = self._micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, micro)
        return micro

    @contextlib.contextmanager
    def _member_rng(self, i: int, micro: int) -> Iterator[None]:
        """Dropout and other in-model randomness of member i: seeded by (member seed, step, micro-step)."""
        seed = mix_seed(self.args.member_seeds[i], self.state.global_step, micro, TAG_DROPOUT)
        device = self.args.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)
            yield

    # -- clipping, logging --------------------------------------------------------------------------
    def _clip_grad_norm(self, model: nn.Module):
        """Clip each member's gradient to ``max_grad_norm`` separately; return the norm of all members.

        The gradients are unscaled first (once per step; the scaler's step then does not unscale again).
        `Accelerator.unscale_gradients` does this only when accelerate itself set up fp16, so a scaler
        installed otherwise is handled here too.
        """
        scaler = self.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(getattr(self.optimizer, "optimizer", self.optimizer))
        norms = [torch.nn.utils.clip_grad_norm_([p for p in mem.parameters() if p.grad is not None],
                                                self.args.max_grad_norm) for mem in self.ensemble.members]
        total = torch.linalg.vector_norm(torch.stack(norms))
        if not self._data_mode:  # each process clipped its own members
            sq = total.pow(2)
            dist.all_reduce(sq)
            total = sq.sqrt()
        return total

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        """The logged ``grad_norm`` of all members; without clipping it is read without unscaling (``/ scale``)."""
        if grad_norm is not None:
            return grad_norm
        grads = [p.grad for p in self.ensemble.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)).float()) if grads else None
        if not self._data_mode:  # each process holds its members' gradients
            sq = norm.pow(2) if norm is not None else torch.zeros((), device=self.args.device)
            dist.all_reduce(sq)
            norm = sq.sqrt()
        return None if norm is None else self._unscaled(norm)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (every process logs it): add the per-member statistics of the window
            self._count_skipped_step()
            if self.accelerator.num_processes > 1:
                self._step_log.all_reduce(steps_per_process=not self._data_mode)
            logs.update(self._step_log.drain())
        super().log(logs, start_time)

    @property
    def _data_mode(self) -> bool:
        return self.args.ensemble_parallelism == "data" or self.accelerator.num_processes == 1

    def _synchronize(self) -> None:
        """Give every process the same ensemble before evaluation, scoring and saving (a collective).

        Data mode: rank 0's buffers (BatchNorm statistics), as DDP does at each forward; each process
        updates its running statistics on its own rows. Members mode: each member's weights and buffers
        from the process that trains it.
        """
        world = self.accelerator.num_processes
        if world == 1:
            return
        if self._data_mode:
            for buffer in self.ensemble.buffers():
                dist.broadcast(buffer.data, src=0)
            return
        for i, member in enumerate(self.ensemble.members):
            for tensor in list(member.parameters()) + list(member.buffers()):
                dist.broadcast(tensor.data, src=i % world)

    # -- evaluation ---------------------------------------------------------------------------------
    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple:
        """``(loss, (logits (B, C), member_logits (B, m, C)), labels (B,))`` of one evaluation batch.

        ``loss`` is the mean over members of each member's mean cross-entropy (no label smoothing):
        the number to compare with a single model's loss and with the ensemble's NLL.
        """
        inputs = self._clean_view(self._prepare_inputs(self._standard_labels(dict(inputs))))
        labels = next((inputs.pop(k) for k in LABEL_KEYS if k in inputs), None)
        for k in INDEX_KEYS:
            inputs.pop(k, None)
        with torch.no_grad(), self.autocast_smart_context_manager():
            out = self.ensemble(**inputs)
        loss = None if labels is None else _mean_member_loss(self.ensemble.loss_fn, out.member_logits, labels).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, (out.logits.detach(), out.member_logits.detach()), labels

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """The stock loop, with ``{prefix}_loss`` recomputed from the gathered member logits of every row.

        The stock loop averages per-batch losses, weighting each by the nominal batch size and counting
        the rows that pad the last batch of each process; here every row counts once, so W processes
        give the 1-process value. Loss-only evaluation still collects the (N, m, C) logits to do so.
        """
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        self._synchronize()
        compute_metrics = self.compute_metrics
        if loss_only:
            self.compute_metrics = None
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=False,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self.compute_metrics = compute_metrics
        metrics = dict(output.metrics or {})
        predictions, labels = output.predictions, output.label_ids
        if isinstance(predictions, (tuple, list)) and len(predictions) == 2 and labels is not None:
            member_logits = torch.as_tensor(predictions[1])
            metrics[f"{metric_key_prefix}_loss"] = float(_mean_member_loss(
                self.ensemble.loss_fn, member_logits, torch.as_tensor(labels), finite_only=self.args.logging_nan_inf_filter))
        if loss_only:
            predictions = labels = None
        return EvalLoopOutput(predictions=predictions, label_ids=labels, metrics=metrics,
                              num_samples=output.num_samples)

    # -- saving and the Hub --------------------------------------------------------------------------
    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs) -> str:
        """Upload the ensemble (config, model card with the latest eval metrics, members) as one Hub repo.

        The repo is ``args.hub_model_id`` or the name of ``args.output_dir``; see `EnsembleModel.push_to_hub`.
        """
        if revision is not None:
            raise ValueError(f"push_to_hub: revision is not supported for ensembles; got {revision!r}")
        repo_id = self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))
        metrics = {k: v for log in self.state.log_history for k, v in log.items() if k.startswith("eval_")}
        return self.ensemble.push_to_hub(
            repo_id, config=self.args, metrics=metrics or None, token=token or self.args.hub_token,
            private=self.args.hub_private_repo, commit_message=commit_message or "Upload ensemble", **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The stock save, with the ensemble's weights written by `safetensors.torch.save_model`.

        A member whose state dict holds two names for one tensor (an output layer tied to an embedding)
        would make `safetensors.torch.save_file` refuse; `save_model` writes each shared tensor once.
        """
        ensemble = self.ensemble
        if state_dict is not None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            safetensors.torch.save_model(ensemble, os.path.join(output_dir, SAFE_WEIGHTS_NAME),
                                         metadata={"format": "pt"})
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_ensemble_weights(self, folder: str) -> None:
        """Load the weights `_save` wrote in ``folder`` (strict; shared tensors stay shared)."""
        path = os.path.join(folder, SAFE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {folder} holds no {SAFE_WEIGHTS_NAME}; pass a checkpoint folder "
                             "written by SharpBalanceTrainer (output_dir/checkpoint-<step>)")
        try:
            safetensors.torch.load_model(self.ensemble, path, strict=True, device="cpu")  # copied into place
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ValueError(
                f"resume_from_checkpoint: the weights in {path} do not fit this ensemble (a different model, width, "
                f"number of classes or num_members?): {first[0] if first else err} "
                "Build the ensemble exactly as for the run that wrote the checkpoint.") from None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_ensemble_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_ensemble_weights(self.state.best_model_checkpoint)

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self._sharpbalance_state(), os.path.join(folder, STATE_NAME))
            if self.member_averages is not None:
                torch.save(self.member_averages.state_dict(), os.path.join(folder, AVERAGES_NAME))

    def _sharpbalance_state(self) -> dict:
        return {
            "ensemble_method": self.args.ensemble_method,
            "member_seeds": list(self.args.member_seeds),
            "sam_masks": self.sam_masks,
            "sample_scores": self.sample_scores,
            "last_scored_epoch": self.last_scored_epoch,
            "scoring_history": list(self.scoring_history),
        }

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The stock save; in members mode the file holds every member's optimizer state (one format for any W)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self._data_mode:
            return
        from accelerate.utils import gather_object

        states = gather_object([self.optimizer.state_dict()])
        if self.args.should_save:
            merged = states[0]
            for other in states[1:]:
                merged["state"].update(other["state"])
            torch.save(merged, os.path.join(output_dir, OPTIMIZER_NAME))

    def _load_averages(self, checkpoint: str) -> None:
        if self.member_averages is None:
            return
        path = os.path.join(checkpoint, AVERAGES_NAME)
        if os.path.isfile(path):
            self.member_averages.load_state_dict(torch.load(path, weights_only=True, map_location=self.args.device))
        elif self.state.global_step >= self.args.moving_average_start_step:
            logger.warning("%s has no %s: the moving averages start again from the resumed weights.",
                           checkpoint, AVERAGES_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and not self._data_mode:  # keep the state of this process's members only
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            owned = {id(p) for i in self.owned_members for p in self.ensemble.members[i].parameters()}
            for p in [p for p in inner.state if id(p) not in owned]:
                del inner.state[p]
        if checkpoint is None:
            return
        self._load_averages(checkpoint)
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            logger.warning("%s has no %s: resuming without SAM masks, scores or scoring history.", checkpoint, STATE_NAME)
            return
        state = torch.load(path, weights_only=True)
        if list(state["member_seeds"]) != list(self.args.member_seeds):
            raise ValueError(f"resume: checkpoint member_seeds {state['member_seeds']} differ from "
                             f"SharpBalanceConfig.member_seeds {self.args.member_seeds}")
        self.sam_masks = state["sam_masks"]
        self.sample_scores = state["sample_scores"]
        self.last_scored_epoch = state["last_scored_epoch"]
        self.scoring_history = list(state["scoring_history"])


# -- helpers -----------------------------------------------------------------------------------------
def _check_inputs(model, args, train_dataset, score_dataset) -> None:
    if not isinstance(model, EnsembleModel):
        raise TypeError(f"SharpBalanceTrainer.model must be an EnsembleModel; got {type(model).__name__}")
    if not isinstance(args, SharpBalanceConfig):
        raise TypeError(f"SharpBalanceTrainer.args must be a SharpBalanceConfig; got {type(args).__name__}")
    if model.num_members != args.num_members:
        raise ValueError(f"SharpBalanceConfig.num_members must equal the ensemble's {model.num_members} members; "
                         f"got {args.num_members}")
    if score_dataset is not None and train_dataset is not None and len(score_dataset) != len(train_dataset):
        raise ValueError(f"score_dataset must have the training set's {len(train_dataset)} rows (row-aligned); "
                         f"got {len(score_dataset)}")


def _check_transform_columns(args: SharpBalanceConfig, **datasets_by_name) -> None:
    """Refuse an HF dataset with an on-the-fly transform while ``remove_unused_columns=True``.

    The Trainer would drop the raw columns (e.g. ``img``) that the transform reads before it runs.
    """
    if not args.remove_unused_columns:
        return
    for name, dataset in datasets_by_name.items():
        for ds in (dataset.values() if isinstance(dataset, dict) else [dataset]):
            fmt = getattr(ds, "format", None)
            if isinstance(fmt, dict) and fmt.get("type") == "custom":
                raise ValueError(
                    f"SharpBalanceConfig.remove_unused_columns=True would drop the columns that the transform of "
                    f"{name} (set by with_transform/set_transform) reads; set remove_unused_columns=False.")


class _AverageAfterStep(TrainerCallback):
    """Adds each member's weights to its moving average after every optimizer step (EoA)."""

    def __init__(self, trainer: SharpBalanceTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.member_averages is not None:
            self.trainer.member_averages.update(self.trainer.ensemble.members, state.global_step)


def _check_averaging(args: SharpBalanceConfig, world: int) -> None:
    if args.moving_average_start_step is None:
        return
    if args.ensemble_parallelism == "members" and world > 1:
        raise ValueError("SharpBalanceConfig.moving_average_start_step is not supported with "
                         f"ensemble_parallelism='members' on {world} processes yet; use ensemble_parallelism='data'")
    if args.load_best_model_at_end:
        raise ValueError("SharpBalanceConfig.moving_average_start_step and load_best_model_at_end=True both choose the "
                         "final weights (the averages vs the best checkpoint's live weights); set only one")


def _owned_members(num_members: int, args: SharpBalanceConfig, world: int, rank: int) -> list[int]:
    """The members this process trains: all in data mode, ``{i : i mod W = rank}`` in members mode."""
    if args.ensemble_parallelism == "data" or world == 1:
        return list(range(num_members))
    if world > num_members:
        raise ValueError(f"SharpBalanceConfig.ensemble_parallelism='members' needs at most one process per member: "
                         f"num_members={num_members}, {world} processes; use ensemble_parallelism='data' or launch "
                         f"<= {num_members} processes")
    return [i for i in range(num_members) if i % world == rank]


class _OwnedMembers:
    """A `MemberBatchSampler` yielding only the keys of the given members (members mode)."""

    def __init__(self, sampler: MemberBatchSampler, members: list[int]) -> None:
        self.sampler, self.members, self.batch_size = sampler, set(members), None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            yield [k for k in keys if k[0] in self.members]


def _check_trainer_args(trainer: SharpBalanceTrainer, kwargs: dict, default_metrics: bool) -> None:
    """Refuse what only the built trainer shows (the environment's plugins, the devices, the metric function)."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError("SharpBalanceConfig.fsdp / deepspeed (set by the accelerate environment) is not supported: "
                         "members are trained whole on each process (one device or data-parallel processes)")
    if trainer.args.n_gpu > 1:
        raise ValueError(f"SharpBalanceTrainer needs one device per process; {trainer.args.n_gpu} GPUs are visible to one "
                         "process (torch DataParallel). Launch one process per GPU (`accelerate launch` / `torchrun`) "
                         "or set CUDA_VISIBLE_DEVICES.")
    if kwargs.get("compute_loss_func") is not None:
        raise ValueError("SharpBalanceTrainer.compute_loss_func is not supported: a scalar loss over the batch cannot "
                         "serve per-member training and per-sample scoring; pass a per-sample member loss as "
                         "EnsembleModel(..., loss_fn=fn) with fn(logits (B, C), labels (B,)) -> (B,); got a "
                         "compute_loss_func")
    if trainer.args.batch_eval_metrics and default_metrics:
        raise ValueError("SharpBalanceConfig.batch_eval_metrics=True needs your own compute_metrics(eval_pred, "
                         "compute_result): the default ensemble metrics need every prediction at once; got "
                         "batch_eval_metrics=True and no compute_metrics")


def _set_reduction(model: EnsembleModel, args: SharpBalanceConfig) -> None:
    """Make ``ensemble_reduction`` the ensemble's own reduction: evaluation, saving and the card then agree."""
    if args.ensemble_reduction is None:
        return
    if model.reduction != args.ensemble_reduction:
        logger.info("SharpBalanceConfig.ensemble_reduction=%r replaces the ensemble's reduction %r.",
                    args.ensemble_reduction, model.reduction)
        model.reduction = args.ensemble_reduction


def _training_loss(model: EnsembleModel, args: SharpBalanceConfig) -> MemberLoss:
    """The training member loss: the ensemble's, with ``label_smoothing_factor`` added to the default cross-entropy."""
    if args.label_smoothing_factor == 0:
        return model.loss_fn
    if model.loss_fn is not cross_entropy_per_sample:
        raise ValueError(f"SharpBalanceConfig.label_smoothing_factor={args.label_smoothing_factor} applies to the default "
                         "member loss only; the ensemble has its own loss_fn (smooth the labels inside it, or set "
                         "label_smoothing_factor=0)")
    return functools.partial(cross_entropy_per_sample, label_smoothing=args.label_smoothing_factor)


def _label_column(args: SharpBalanceConfig) -> str | None:
    """The label column named by ``label_names`` (one name, or None for the standard columns)."""
    names = args.label_names
    if not names:
        return None
    if len(names) != 1:
        raise ValueError(f"SharpBalanceConfig.label_names must name one label column (classification); got {names!r}")
    return None if names[0] == "labels" else names[0]


def _mean_member_loss(loss_fn: MemberLoss, member_logits: torch.Tensor, labels: torch.Tensor,
                      finite_only: bool = False) -> torch.Tensor:
    """Mean over rows and members of the per-sample member loss: member logits ``(N, m, C)``, labels ``(N,)``.

    ``finite_only``: average the rows whose loss is finite (``logging_nan_inf_filter``), when any is.
    """
    m = member_logits.shape[1]
    labels = labels.to(member_logits.device).long().reshape(-1)
    per_row = torch.stack([loss_fn(member_logits[:, i], labels).float().reshape(-1) for i in range(m)], 1).mean(1)
    finite = torch.isfinite(per_row)
    if finite_only and bool(finite.any()):
        per_row = per_row[finite]
    return per_row.mean()


def _all_reduce_sum_grads(ensemble: nn.Module) -> None:
    """Sum ``.grad`` over processes with one flat all-reduce (each process holds its rows' share of the mean)."""
    grads = [p.grad for p in ensemble.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
