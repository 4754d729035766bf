"""`SharpBalanceTrainer`: one HF `Trainer` that trains an m-member ensemble by deep ensemble, SAM or SharpBalance.

Per optimizer step every member ``i`` takes its own sub-batch ``B`` (`sbtrainer.sampling`), split into
``S = B ∩ D_i^SAM`` and ``N = B \\ S``, and leaves in ``.grad`` (DESIGN.md §1)::

    g = (|S|/|B|) ∇L_S(θ + ε_S) + (|N|/|B|) ∇L_N(θ),    ε_S = ρ ∇L_S(θ) / ‖∇L_S(θ)‖

``deep_ensemble`` has ``S = ∅``; ``sam`` has ``S = B``; ``sharpbalance`` uses ``S = B`` before the first
scoring (epochs ``[0, Td)``) and the installed masks after. The Trainer's own loop then clips (per
member), steps the optimizer and the scheduler. Members never share a gradient: the ensemble loss is
a sum, and with several processes the gradients are averaged by one all-reduce per optimizer step
(the ascent gradient stays local, as in m-sharpness).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callbacks import SharpnessScoringCallback
from .config import SharpBalanceConfig
from .ensemble import EnsembleModel
from .modeling import INDEX_KEYS, LABEL_KEYS, batch_labels
from .sam import frozen_norm_stats, perturbed, sam_epsilon, stash_grads, unstash_grads
from .sampling import TAG_DROPOUT, MemberBatchSampler, MemberStreamDataset, SeededRowsDataset, mix_seed

logger = logging.getLogger(__name__)

STATE_NAME = "sharpbalance_state.pt"


class _StepLog:
    """Per-member training statistics accumulated on device between two logging steps (no host syncs)."""

    def __init__(self, num_members: int) -> None:
        self.m = num_members
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.loss = [0.0] * self.m
        self.sam_fraction = [0.0] * self.m
        self.ascent_norm = [0.0] * self.m
        self.ascents = [0] * self.m
        self.skipped = 0

    def add(self, i: int, loss: torch.Tensor, sam_fraction: float, norm: torch.Tensor | None) -> None:
        self.loss[i] = self.loss[i] + loss.detach().float()
        self.sam_fraction[i] += sam_fraction
        if norm is not None:
            self.ascent_norm[i] = self.ascent_norm[i] + norm.detach().float()
            self.ascents[i] += 1
            self.skipped = self.skipped + (~torch.isfinite(norm)).int()

    def drain(self) -> dict[str, float]:
        """The means over the batches since the last drain, as floats; resets."""
        if self.batches == 0:
            return {}
        out: dict[str, float] = {}
        for i in range(self.m):
            out[f"member_{i}_loss"] = float(self.loss[i]) / self.batches
            out[f"member_{i}_sam_fraction"] = self.sam_fraction[i] / self.batches
            if self.ascents[i]:
                out[f"member_{i}_ascent_grad_norm"] = float(self.ascent_norm[i]) / self.ascents[i]
        out["skipped_ascents"] = float(self.skipped)
        self.reset()
        return out


class SharpBalanceTrainer(Trainer):
    """A `transformers.Trainer` for `EnsembleModel`s configured by `SharpBalanceConfig`.

    Args:
        model: the ensemble.
        args: the config.
        score_dataset: the training set's eval-time view (same rows, no augmentation) used for per-sample
            sharpness; defaults to ``train_dataset`` itself.
        **kwargs: every other `Trainer` argument (datasets, collator, callbacks, optimizers, ...).
    """

    def __init__(self, model: EnsembleModel, args: SharpBalanceConfig, score_dataset=None, **kwargs) -> None:
        _check_inputs(model, args, kwargs.get("train_dataset"), score_dataset)
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = _default_compute_metrics(args)
        super().__init__(model=model, args=args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("SharpBalanceTrainer supports one device or DDP; DeepSpeed and FSDP are not supported")
        self.model_accepts_loss_kwargs = False  # EnsembleModel.forward(**inputs) does not scale for num_items_in_batch
        self.score_dataset = score_dataset
        self.sam_masks: torch.Tensor | None = None
        self.sample_scores: torch.Tensor | None = None
        self.last_scored_epoch: int | None = None
        self.scoring_history: list[dict] = []
        self._step_log = _StepLog(model.num_members)
        self._micro = (-1, -1)  # (global_step, micro-step index) of the last training_step
        self._update_steps_per_epoch: int | None = None
        if args.ensemble_method == "sharpbalance":
            self.add_callback(SharpnessScoringCallback(self))

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

    def install_scores(self, scores: torch.Tensor, masks: torch.Tensor, epoch: int) -> None:
        """Record a scoring's scores ``(m, N)`` and masks ``(m, N)`` made at the start of ``epoch``."""
        self.set_sam_masks(masks)
        self.sample_scores = scores.detach().float().cpu().clone()
        self.last_scored_epoch = epoch
        self.scoring_history.append({"epoch": epoch, "global_step": self.state.global_step})

    def scoring_data(self, epoch: int) -> tuple:
        """The dataset and collator per-sample scoring iterates at ``epoch`` (unused columns removed).

        ``score_dataset`` (the eval view) when given; otherwise the training set with any random
        transform fixed by the seed ``(seed, epoch, row)``, so scores are reproducible.
        """
        if self.score_dataset is not None:
            return self._with_model_columns(self.score_dataset, "scoring")
        dataset, collate_fn = self._with_model_columns(self.train_dataset, "scoring")
        return SeededRowsDataset(dataset, mix_seed(self.args.seed, epoch)), collate_fn

    # -- data ---------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # The ensemble's forward(**inputs) names no inputs: keep the members' inputs, labels and index columns.
        if self._signature_columns is None:
            self._signature_columns = self.ensemble.input_names() + list(LABEL_KEYS) + list(INDEX_KEYS)
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
        params = {"batch_sampler": self._member_sampler, "collate_fn": collate_fn,
                  "num_workers": args.dataloader_num_workers, "pin_memory": args.dataloader_pin_memory}
        if args.dataloader_num_workers > 0:
            params.update(persistent_workers=args.dataloader_persistent_workers,
                          prefetch_factor=args.dataloader_prefetch_factor)
        loader = self.accelerator.prepare(DataLoader(MemberStreamDataset(dataset, args.member_seeds), **params))
        steps = len(loader)
        ga = args.gradient_accumulation_steps
        self._update_steps_per_epoch = max(steps // ga + int(steps % ga > 0), 1)
        return loader

    def _run_epoch(self, *args, **kwargs):
        # The per-member order depends on the epoch; set it on the sampler we own, whatever wraps it.
        self._member_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _prepare_for_training(self, *args, **kwargs):
        """Prepare as the stock Trainer does, then drop the DistributedDataParallel wrapper it built.

        Gradients are averaged by one flat all-reduce per optimizer step (`_all_reduce_mean_grads`):
        the SAM ascent must stay local to each process, so DDP's reducer would never be used. Keeping
        the wrapper would cost a gradient-sized bucket copy per process and keep the process group
        referenced by an object that is only freed at interpreter shutdown, where Gloo can abort
        (SIGABRT) after a successful run. DDP's construction already broadcast rank 0's weights.
        """
        model, loader = super()._prepare_for_training(*args, **kwargs)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
            self.model_wrapped = model
        return model, loader

    # -- the step -----------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """Forward/backward of every member on its sub-batch; ``.grad`` holds the final gradient.

        Returns the detached sum over members of each member's mean loss at θ, divided by the
        accumulation steps (as the stock `Trainer.training_step` returns its loss).
        """
        ensemble = self.ensemble
        ensemble.train()
        sample_index = inputs.pop("sample_index").cpu()
        member_index = inputs.pop("member_index").cpu()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        micro = self._next_micro_step()
        total = torch.zeros((), device=self.args.device)
        for i in range(ensemble.num_members):
            rows = torch.nonzero(member_index == i).squeeze(1)
            if rows.numel() == 0:  # cannot happen with our sampler; a custom one may leave a member out
                continue
            batch = _take(inputs, rows, len(member_index), self.args.device)
            sam_mask = self._sam_mask(i, sample_index[rows])
            with self._member_rng(i, micro):
                loss = self._member_step(i, batch, sam_mask, scale)
            total = total + loss
        self._step_log.batches += 1
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            _all_reduce_mean_grads(ensemble)
        return total.detach() * scale

    def _member_step(self, i: int, batch: dict, sam_mask: torch.Tensor, scale: float) -> torch.Tensor:
        """Leave member i's gradient (× scale) in ``.grad``; return its mean loss at θ over the sub-batch."""
        member = self.ensemble.members[i]
        n_b = int(sam_mask.numel())
        n_s = int(sam_mask.sum())
        rho = self.args.rho_of(i)
        if n_s == 0 or rho == 0.0:  # a plain pass: one forward+backward over B
            loss = self._loss(i, batch, n_b)
            self._backward(loss * scale)
            self._step_log.add(i, loss, n_s / n_b, None)
            return loss
        s_rows = torch.nonzero(sam_mask).squeeze(1)
        n_rows = torch.nonzero(~sam_mask).squeeze(1)
        s_batch = batch if n_s == n_b else _take(batch, s_rows, n_b, self.args.device)
        params = [p for p in member.parameters() if p.requires_grad]
        stash = stash_grads(params)
        loss_s = self._loss(i, s_batch, n_s)  # ascent at θ (updates BatchNorm running stats)
        self._backward(loss_s)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        eps, norm, _ = sam_epsilon(params, grads, rho, self.args.adaptive)
        for p in params:
            p.grad = None
        with perturbed(params, eps), frozen_norm_stats(member):
            self._backward(self._loss(i, s_batch, n_s) * (n_s / n_b * scale))
        loss = loss_s.detach() * (n_s / n_b)
        if n_s < n_b:
            loss_n = self._loss(i, _take(batch, n_rows, n_b, self.args.device), n_b - n_s)
            self._backward(loss_n * ((n_b - n_s) / n_b * scale))
            loss = loss + loss_n.detach() * ((n_b - n_s) / n_b)
        unstash_grads(params, stash)
        self._step_log.add(i, loss, n_s / n_b, norm)
        return loss

    def _loss(self, i: int, batch: dict, size: int) -> torch.Tensor:
        """Mean cross-entropy of member i on ``batch`` (BatchNorm on running stats for a 1-sample batch)."""
        labels = batch_labels(batch)
        member = self.ensemble.members[i]
        ctx = _norm_eval(member) if size == 1 else contextlib.nullcontext()
        with ctx, self.accelerator.autocast():
            logits = self.ensemble.member_forward(i, batch)
        return F.cross_entropy(logits.float(), labels)

    def _backward(self, loss: torch.Tensor) -> None:
        # Not accelerator.backward: it also divides by its own accumulation steps; we scale explicitly.
        scaler = self.accelerator.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

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
        """Clip each member's gradient to ``max_grad_norm`` separately; return the norm of all members."""
        self.accelerator.unscale_gradients()
        norms = [torch.nn.utils.clip_grad_norm_([p for p in mem.parameters() if p.grad is not None],
                                                self.args.max_grad_norm) for mem in self.ensemble.members]
        return torch.linalg.vector_norm(torch.stack(norms))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the per-member statistics of the same window
            logs.update(self._step_log.drain())
        super().log(logs, start_time)

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

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self._sharpbalance_state(), os.path.join(folder, STATE_NAME))

    def _sharpbalance_state(self) -> dict:
        return {
            "ensemble_method": self.args.ensemble_method,
            "member_seeds": list(self.args.member_seeds),
            "sam_masks": self.sam_masks,
            "sample_scores": self.sample_scores,
            "last_scored_epoch": self.last_scored_epoch,
            "scoring_history": list(self.scoring_history),
        }

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
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


def _default_compute_metrics(args: SharpBalanceConfig):
    from .metrics import make_compute_metrics

    return make_compute_metrics(reduction=args.ensemble_reduction)


def _take(batch: dict, rows: torch.Tensor, total: int, device: torch.device) -> dict:
    """Rows ``rows`` (CPU int64) of every per-sample tensor (first dim == total) of ``batch``; other values as they are.

    A contiguous run of rows is a slice (a view, no copy); other rows are gathered on ``device``.
    """
    contiguous = rows.numel() > 0 and int(rows[-1]) - int(rows[0]) + 1 == rows.numel()
    index = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows.to(device, non_blocking=True)

    def pick(v):
        if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total):
            return v
        return v[index]  # a slice is a view; advanced indexing keeps channels_last (index_select does not)

    return {k: pick(v) for k, v in batch.items()}


@contextlib.contextmanager
def _norm_eval(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode (running statistics) inside the block: batch statistics of 1 sample are undefined."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _all_reduce_mean_grads(ensemble: nn.Module) -> None:
    """Average ``.grad`` over processes with one flat all-reduce."""
    grads = [p.grad for p in ensemble.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
