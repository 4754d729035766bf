"""Worker for tests/test_metrics.py: ensemble metrics on per-process shards, gathered by accelerate.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 tests/_dist_metrics_worker.py OUT.json``.
Each case builds the same seeded data on every process, gives each process its shard (rank 0 the
first ``split`` rows, rank 1 the rest), calls ``ensemble_metrics(..., accelerator=...)`` and rank 0
writes ``{case_name: metrics}`` to ``OUT.json``. Every rank checks it got the same result as rank 0.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator

from sbtrainer.metrics import ensemble_metrics

# (name, N, m, C, rows on rank 0, reduction)
CASES = [
    ("uneven_logits", 7, 3, 5, 4, "logits"),
    ("uneven_probs", 7, 3, 5, 4, "probs"),
    ("even_logits", 8, 2, 3, 4, "logits"),
    ("rank1_empty", 5, 3, 4, 5, "logits"),
]


def case_data(n: int, m: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded member logits ``(n, m, c)`` (float64) and labels ``(n,)``; also used by the test."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, m, c, generator=gen, dtype=torch.float64) * 2.0
    labels = torch.randint(0, c, (n,), generator=gen)
    return logits, labels


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    results = {}
    for name, n, m, c, split, reduction in CASES:
        logits, labels = case_data(n, m, c)
        rows = slice(0, split) if rank == 0 else slice(split, n)
        results[name] = ensemble_metrics(logits[rows], labels[rows], reduction=reduction, accelerator=accelerator)
    # every process must hold the full-data result
    from accelerate.utils import gather_object

    everyone = gather_object([json.dumps(results, sort_keys=True)])
    assert len(set(everyone)) == 1, "processes disagree"
    if accelerator.is_main_process:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
