"""Loaders for the published corrupted test sets, and the pooled evaluation over them.

Sets (Hendrycks & Dietterich, ICLR 2019):

- CIFAR-10-C / CIFAR-100-C: a folder of ``<corruption>.npy`` (uint8, ``(5 * N, 32, 32, 3)``, the N=10,000
  test images at severity 1, then 2, ... 5) and ``labels.npy`` (``(5 * N,)``, or ``(N,)`` in some copies);
- Tiny-ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``;
- a Hub / parquet copy with one row per image and ``corruption`` and ``severity`` columns.

:func:`evaluate_corruptions` runs an evaluation function on every (corruption, severity) set and pools
the metrics the way the SharpBalance paper (Lu et al., NeurIPS 2024) reports them: per severity, the
mean over corruptions (App. F.1, Tables 2–4), and over everything, the mean over all corruptions and
severities (Fig. 7, "OOD accuracy").

``datasets`` is imported inside the functions, so this module imports on machines without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .corruptions import CORRUPTIONS, SEVERITIES, check_severity

logger = logging.getLogger(__name__)

EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The four held-out corruptions also shipped in the published CIFAR-10-C / CIFAR-100-C folders."""

KNOWN_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS

NOT_POOLED: tuple[str, ...] = ("runtime", "samples_per_second", "steps_per_second", "epoch")
"""Metric names (after the set prefix) that :func:`evaluate_corruptions` reports per set but never pools."""

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _check_known(corruption: object) -> str:
    if not isinstance(corruption, str) or corruption not in KNOWN_CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {corruption!r}; expected one of: {', '.join(KNOWN_CORRUPTIONS)}"
        )
    return corruption


def _existing_dir(root: str | os.PathLike, what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


# ----------------------------------------------------------------------------- CIFAR-10-C / CIFAR-100-C


def _cifar_c_files(root: str | os.PathLike, corruption: str) -> tuple[Path, Path]:
    folder = _existing_dir(root, "CIFAR-C")
    data, labels = folder / f"{corruption}.npy", folder / "labels.npy"
    for path in (data, labels):
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-C file not found: {path} (expected <corruption>.npy and labels.npy in {folder})"
            )
    return data, labels


def _cifar_c_slice(data_path: Path, labels_path: Path, severity: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.load(data_path, mmap_mode="r")
    labels = np.load(labels_path, mmap_mode="r")
    if images.ndim != 4 or images.shape[0] % 5:
        raise ValueError(
            f"{data_path}: expected shape (5 * N, H, W, C) in severity order, got {images.shape}"
        )
    n = images.shape[0] // 5
    if labels.shape[0] == images.shape[0]:
        labels = labels[(severity - 1) * n : severity * n]
    elif labels.shape[0] != n:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} or {n} labels for {data_path.name}, got {labels.shape[0]}"
        )
    return np.asarray(images[(severity - 1) * n : severity * n]), np.asarray(labels)


def load_cifar_c(root: str | os.PathLike, corruption: str, severity: int, image_column: str = "img",
                 label_column: str = "label") -> Any:
    """One (corruption, severity) set of a published CIFAR-10-C / CIFAR-100-C folder.

    Args:
        root: the folder holding ``<corruption>.npy`` (``(5 * N, 32, 32, 3)`` uint8, severities 1..5
            in order) and ``labels.npy``.
        corruption: one of the 15 benchmark corruptions or the 4 extra ones (:data:`KNOWN_CORRUPTIONS`).
        severity: 1..5; rows ``(severity - 1) * N : severity * N`` are returned.
        image_column, label_column: output column names; the defaults match the Hub's
            ``uoft-cs/cifar10`` (``img``, ``label``), so the clean test set's transforms apply
            (CIFAR-100 on the Hub names its label ``fine_label``: pass that).

    Returns:
        ``datasets.Dataset`` with ``image_column`` (``datasets.Image``, decoded as PIL) and
        ``label_column`` (int64), N rows.

    Raises:
        ValueError: unknown corruption or severity outside 1..5, or a file of the wrong shape.
        FileNotFoundError: the folder, ``<corruption>.npy`` or ``labels.npy`` is missing (named).
    """
    import datasets

    _check_known(corruption)
    severity = check_severity(severity)
    images, labels = _cifar_c_slice(*_cifar_c_files(root, corruption), severity)
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {image_column: list(images), label_column: labels.astype(np.int64).tolist()}, features=features
    )


def iter_cifar_c(
    root: str | os.PathLike,
    corruptions: Sequence[str] | None = None,
    severities: Iterable[int] = SEVERITIES,
    image_column: str = "img",
    label_column: str = "label",
) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(corruption, severity, dataset)`` over a CIFAR-C folder (see :func:`load_cifar_c`).

    ``corruptions=None`` means the 15 benchmark corruptions (:data:`~sbtrainer.data.corruptions.CORRUPTIONS`).
    Every file is checked before the first set is yielded, so a missing one fails fast rather than
    after an hour of evaluation.
    """
    names = [_check_known(c) for c in (CORRUPTIONS if corruptions is None else corruptions)]
    sevs = [check_severity(s) for s in severities]
    for name in names:
        _cifar_c_files(root, name)
    for name in names:
        for sev in sevs:
            yield name, sev, load_cifar_c(root, name, sev, image_column, label_column)


# ----------------------------------------------------------------------------- Tiny-ImageNet-C


def load_tinyimagenet_c(
    root: str | os.PathLike,
    corruption: str,
    severity: int,
    class_to_idx: Mapping[str, int] | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> Any:
    """One (corruption, severity) set of a Tiny-ImageNet-C folder ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``.

    Args:
        class_to_idx: WordNet id → label index. It must be the mapping the model was trained with;
            ``None`` uses the sorted wnids of the folder (torchvision ``ImageFolder``'s rule).
        image_column, label_column: output column names.

    Returns:
        ``datasets.Dataset`` with ``image_column`` (``datasets.Image`` holding the file paths, decoded
        lazily as PIL) and ``label_column`` (int64), sorted by class then file name.

    Raises:
        ValueError: unknown corruption, severity outside 1..5, a wnid missing from ``class_to_idx``,
            or a folder without images.
        FileNotFoundError: the ``<root>/<corruption>/<severity>`` folder is missing (named).
    """
    import datasets

    _check_known(corruption)
    severity = check_severity(severity)
    _existing_dir(root, "Tiny-ImageNet-C")
    folder = _existing_dir(Path(root) / corruption / str(severity), "Tiny-ImageNet-C set")
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    mapping = dict(class_to_idx) if class_to_idx is not None else {w: i for i, w in enumerate(wnids)}
    unknown = [w for w in wnids if w not in mapping]
    if unknown:
        raise ValueError(
            f"{folder}: class folders {unknown[:5]} are not in class_to_idx ({len(unknown)} in all)"
        )
    paths, labels = [], []
    for wnid in wnids:
        files = sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [int(mapping[wnid])] * len(files)
    if not paths:
        raise ValueError(f"{folder}: no images found (expected <wnid>/*.JPEG)")
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.Value("int64")})
    return datasets.Dataset.from_dict({image_column: paths, label_column: labels}, features=features)


# ----------------------------------------------------------------------------- parquet / Hub copies


def _looks_local(path_or_repo: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else is taken as a local path."""
    return (
        path_or_repo.startswith((".", "/", "~"))
        or path_or_repo.endswith(".parquet")
        or path_or_repo.count("/") > 1
    )


def _parquet_files(folder: Path, split: str) -> list[str]:
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {folder}")
    in_split = [p for p in files if p.name.startswith(split) or split in p.relative_to(folder).parts[:-1]]
    return [str(p) for p in (in_split or files)]


def _load_table(path_or_repo: str | os.PathLike, split: str, cache_dir: str | None) -> Any:
    import datasets

    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir)
    if path.is_dir():
        return datasets.Dataset.from_parquet(_parquet_files(path, split), cache_dir=cache_dir)
    if _looks_local(str(path_or_repo)):
        raise FileNotFoundError(f"parquet file or folder not found: {path}")
    return datasets.load_dataset(str(path_or_repo), split=split, cache_dir=cache_dir)


def _column_array(ds: Any, column: str) -> np.ndarray:
    if column not in ds.column_names:
        raise ValueError(f"column {column!r} not found; columns: {ds.column_names}")
    return np.asarray(ds.with_format("numpy", columns=[column])[column])


def load_corrupted_parquet(
    path_or_repo: str | os.PathLike,
    corruption: str,
    severity: int,
    split: str = "test",
    corruption_column: str = "corruption",
    severity_column: str = "severity",
    cache_dir: str | None = None,
) -> Any:
    """The rows of one (corruption, severity) set from a parquet file / folder or a Hub dataset.

    ``path_or_repo`` is a local ``.parquet`` file, a folder of them (those whose name starts with
    ``split`` or that sit in a ``split`` sub-folder are preferred, else all), or a Hub dataset id
    loaded with ``load_dataset(repo, split=split)``. ``cache_dir`` goes to ``datasets``.
    Rows are kept where ``corruption_column == corruption`` and ``severity_column == severity``;
    every other column is returned unchanged.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: severity outside 1..5, a missing column, or a corruption absent from the data
            (the message lists those present).
    """
    severity = check_severity(severity)
    ds = _load_table(path_or_repo, split, cache_dir)
    names = _column_array(ds, corruption_column).astype(str)
    present = sorted(set(names.tolist()))
    if corruption not in present:
        raise ValueError(
            f"corruption {corruption!r} not found in {path_or_repo} (column {corruption_column!r}); present: {present}"
        )
    sevs = _column_array(ds, severity_column).astype(np.int64)
    keep = np.nonzero((names == corruption) & (sevs == severity))[0]
    if keep.size == 0:
        raise ValueError(
            f"no rows with {corruption_column}={corruption!r} and {severity_column}={severity} in {path_or_repo}"
        )
    return ds.select(keep)


# ----------------------------------------------------------------------------- pooled evaluation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _pool(values: Mapping[str, list[float]], key: Callable[[str], str]) -> dict[str, float]:
    return {key(metric): float(np.mean(vals)) for metric, vals in values.items()}


def evaluate_corruptions(
    evaluate_fn: Callable[[Any, str], Mapping[str, Any]],
    sets: Iterable[tuple[str, int, Any]],
    prefix: str = "cifar10c",
    disable_tqdm: bool = False,
) -> dict[str, float]:
    """Evaluate every ``(corruption, severity, dataset)`` of ``sets`` and pool the metrics.

    Args:
        evaluate_fn: ``evaluate_fn(dataset, metric_key_prefix) -> dict``, e.g.
            ``lambda ds, p: trainer.evaluate(ds, metric_key_prefix=p)``; it returns keys
            ``f"{p}_{metric}"`` (e.g. ``f"{p}_ensemble_accuracy"``).
        sets: from :func:`iter_cifar_c`, :func:`~sbtrainer.data.corruptions.iter_corrupted_datasets`
            or any iterable of ``(corruption, severity, dataset)``.
        prefix: the per-set prefix is ``f"{prefix}_{corruption}_{severity}"``.
        disable_tqdm: hide the progress bar over the sets (one step per set; its total is known when
            ``sets`` has a length). Each evaluated set is also logged at INFO.

    Returns:
        Every key that ``evaluate_fn`` returned, plus for each numeric metric ``m`` found as
        ``f"{set_prefix}_{m}"``:

        - ``f"{prefix}_severity_{s}_{m}"``: the mean over the corruptions evaluated at severity ``s``
          (the paper's Tables 2–4);
        - ``f"{prefix}_all_{m}"``: the mean over all sets (the paper's Fig. 7).

        Pooling is the unweighted mean of the per-set values, which equals the pooled value over all
        images when every set has the same size (true for CIFAR-C and Tiny-ImageNet-C) and the metric
        is a per-sample mean (accuracy, NLL, Brier; not exactly for ECE). A metric missing from some
        sets is averaged over the sets that report it. Timing keys (:data:`NOT_POOLED`) are not pooled.

    Raises:
        ValueError: the same (corruption, severity) twice, or ``evaluate_fn`` not returning a mapping.
    """
    results: dict[str, float] = {}
    per_severity: dict[int, dict[str, list[float]]] = {}
    overall: dict[str, list[float]] = {}
    seen: set[tuple[str, int]] = set()
    total = len(sets) if isinstance(sets, Sized) else None
    bar = tqdm(sets, total=total, desc=f"evaluating {prefix} sets", unit="set", disable=disable_tqdm)
    for corruption, severity, dataset in bar:
        if (corruption, severity) in seen:
            raise ValueError(f"set ({corruption!r}, {severity}) appears twice in `sets`")
        seen.add((corruption, severity))
        set_prefix = f"{prefix}_{corruption}_{severity}"
        metrics = evaluate_fn(dataset, set_prefix)
        if not isinstance(metrics, Mapping):
            raise ValueError(
                f"evaluate_fn must return a dict of metrics, got {type(metrics).__name__} for {set_prefix}"
            )
        results.update(metrics)
        for key, value in metrics.items():
            metric = key[len(set_prefix) + 1 :] if key.startswith(set_prefix + "_") else None
            if metric is None or metric in NOT_POOLED or not _is_number(value):
                continue
            per_severity.setdefault(int(severity), {}).setdefault(metric, []).append(float(value))
            overall.setdefault(metric, []).append(float(value))
        logger.info("evaluated %s", set_prefix)
    for severity in sorted(per_severity):
        results.update(_pool(per_severity[severity], lambda m, s=severity: f"{prefix}_severity_{s}_{m}"))
    results.update(_pool(overall, lambda m: f"{prefix}_all_{m}"))
    return results
