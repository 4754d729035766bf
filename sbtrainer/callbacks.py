"""`SharpnessScoringCallback`: when to score, scoring across processes, installing the SAM masks.

At the start of epoch ``Td`` (``scoring_start_epoch``; not one epoch late as in the authors' release)
and, with ``rescore_every=N``, at ``Td + N, Td + 2N, ...``, every member scores every training row
(`sbtrainer.scoring`), the scores are summed across processes (each process scores a contiguous
shard of rows, the rest stay zero), partitioned (`sbtrainer.partition`) and installed on the trainer.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from .partition import partition, top_k_masks
from .scoring import per_sample_sharpness

if TYPE_CHECKING:
    from .trainer import SharpBalanceTrainer

logger = logging.getLogger(__name__)


def is_scoring_epoch(epoch: int, start: int, every: int | None) -> bool:
    """True when scoring is due at the start of ``epoch`` (start = Td, every = rescore_every)."""
    if epoch < start:
        return False
    return epoch == start or (every is not None and (epoch - start) % every == 0)


class SharpnessScoringCallback(TrainerCallback):
    """Scores all members and installs their SAM masks on the trainer at the scheduled epochs."""

    def __init__(self, trainer: SharpBalanceTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        epoch = trainer.current_epoch()
        due = is_scoring_epoch(epoch, args.scoring_start_epoch, args.rescore_every)
        if due and trainer.last_scored_epoch != epoch:
            self.score_and_install(epoch)
        return control

    def score_and_install(self, epoch: int) -> None:
        """Score every member, partition, install masks and scores, log statistics."""
        trainer, args = self.trainer, self.trainer.args
        scores = self.score_members(epoch)
        masks = partition(scores, args.sam_fraction, args.selection, args.residual)
        trainer.install_scores(scores, masks, epoch)
        trainer.log(scoring_statistics(scores, masks, args.sam_fraction, args.selection))
        logger.info("Scored %d members on %d rows at epoch %d.", scores.shape[0], scores.shape[1], epoch)

    def score_members(self, epoch: int) -> torch.Tensor:
        """Scores ``(m, N)`` float32 on CPU, this process scoring rows ``[r N / W, (r + 1) N / W)``."""
        trainer = self.trainer
        acc, args = trainer.accelerator, trainer.args
        ensemble = trainer.ensemble
        dataset, collate_fn = trainer.scoring_data(epoch)
        n, world, rank = len(dataset), acc.num_processes, acc.process_index
        lo, hi = rank * n // world, (rank + 1) * n // world
        scores = torch.zeros(ensemble.num_members, n, device=acc.device)
        for i, member in enumerate(ensemble.members):
            scores[i, lo:hi] = per_sample_sharpness(
                member, dataset, rows=range(lo, hi), collate_fn=collate_fn, batch_size=args.score_batch_size,
                method=args.score_method, input_name=ensemble.input_name, device=acc.device,
                progress=acc.is_local_main_process and not args.disable_tqdm, desc=f"scoring member {i}",
            ).to(acc.device)
        if world > 1:
            scores = acc.reduce(scores, reduction="sum")
        return scores.float().cpu()


def scoring_statistics(scores: torch.Tensor, masks: torch.Tensor, fraction: float, selection: str) -> dict[str, float]:
    """Per-member SAM-set fraction and score statistics, and mean pairwise overlaps, for the logs."""
    m = masks.shape[0]
    top = top_k_masks(scores, fraction, selection)
    stats: dict[str, float] = {}
    for i in range(m):
        s = scores[i].double()
        stats[f"scoring/member_{i}_sam_set_fraction"] = masks[i].float().mean().item()
        stats[f"scoring/member_{i}_score_mean"] = s.mean().item()
        stats[f"scoring/member_{i}_score_median"] = s.median().item()
        stats[f"scoring/member_{i}_score_max"] = s.max().item()
    pairs = list(itertools.combinations(range(m), 2))
    if pairs:
        stats["scoring/sam_set_pairwise_overlap"] = sum(
            (masks[i] & masks[j]).float().mean().item() for i, j in pairs) / len(pairs)
        stats["scoring/top_k_pairwise_jaccard"] = sum(
            _jaccard(top[i], top[j]) for i, j in pairs) / len(pairs)
    return stats


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0
