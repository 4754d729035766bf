"""CIFAR-10 / CIFAR-100 / TinyImageNet data for the recipes: loading, transforms, and the corrupted test sets.

Not a recipe itself; `cifar_resnet.py`, `vit_cifar100.py` and `tradeoff.py` import it. Any dataset
``datasets.load_dataset`` reads works when it has an image column, an integer label column, a ``train``
split and an evaluation split (``test``, else ``validation``, else ``valid``): the Hub's
``uoft-cs/cifar10`` (``img``, ``label``), ``uoft-cs/cifar100`` (``img``, ``fine_label``),
``zh-plus/tiny-imagenet`` (``image``, ``label``; splits ``train`` / ``valid``; 64x64, 200 classes), or a
local folder laid out like them (e.g. ``../shared/data/cifar10``).

Corrupted sets: the published CIFAR-10-C / CIFAR-100-C ``.npy`` folder (``--cifar_c_dir``), the published
Tiny-ImageNet-C folder (``--tinyimagenet_c_dir``, ``<corruption>/<severity>/<wnid>/*.JPEG``), or a
CIFAR-C-like set generated offline from the evaluation split (``--corrupt_offline``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torchvision.transforms as T
from recipe_utils import RecipeError, log_subset, phase, random_subset

from sbtrainer.data import (
    CORRUPTIONS,
    SEVERITIES,
    corruptions_for,
    evaluate_corruptions,
    iter_cifar_c,
    iter_corrupted_datasets,
    load_tinyimagenet_c,
)

logger = logging.getLogger("sbtrainer.recipes.cifar_data")

CIFAR_STATS = {  # per-channel mean and std of the training images, by number of classes
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # TinyImageNet (200 classes): the statistics the authors' release normalises with (the paper gives none)
    200: ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282)),
}
EVAL_SPLITS = ("test", "validation", "valid")
"""Evaluation split names, in order of preference (``zh-plus/tiny-imagenet`` calls its held-out split ``valid``)."""

_WNID = re.compile(r"n\d{8}")


@dataclass
class CifarDataArgs:
    """Where the data comes from and which corrupted sets to evaluate on."""

    dataset_name: str = field(default="uoft-cs/cifar10", metadata={
        "help": "Hub id (uoft-cs/cifar10, uoft-cs/cifar100) or a local folder that datasets.load_dataset reads."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: the Image feature)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Label column (default: 'label', else 'fine_label' as in uoft-cs/cifar100)."})
    cifar_c_dir: str | None = field(default=None, metadata={
        "help": "Folder of the published CIFAR-10-C / CIFAR-100-C files (<corruption>.npy, labels.npy)."})
    tinyimagenet_c_dir: str | None = field(default=None, metadata={"help": (
        "Folder of the published Tiny-ImageNet-C (<corruption>/<severity>/<wnid>/*.JPEG). Labels come from the "
        "training label names when they are WordNet ids (zh-plus/tiny-imagenet's are), else from the sorted wnid "
        "folders.")})
    corrupt_offline: bool = field(default=False, metadata={
        "help": ("Without --cifar_c_dir / --tinyimagenet_c_dir: generate a CIFAR-C-like set from the evaluation "
                 "split with sbtrainer.data.")})
    corrupt_samples: int = field(default=1000, metadata={
        "help": "Test images corrupted per set (--corrupt_offline), drawn at random with --subset_seed."})
    corruptions: list[str] = field(default_factory=list, metadata={
        "help": "Corruptions to evaluate (default: the 15 of CIFAR-10-C / Tiny-ImageNet-C)."})
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES), metadata={"help": "Severities (1..5)."})
    validation_fraction: float = field(default=0.0, metadata={"help": (
        "In [0, 1): hold out this fraction of the (subset) training rows, drawn with --subset_seed, as the evaluation "
        "split 'heldout' instead of the test split: the paper's hyper-parameter selection on 10%% of the training "
        "data (App. D.3). 0 evaluates on the test split.")})


def _load(args: CifarDataArgs) -> Any:
    """``datasets.load_dataset(--dataset_name, --dataset_config_name)``; a missing local folder is a `RecipeError`."""
    looks_local = args.dataset_name.startswith((".", "/", "~")) or args.dataset_name.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(args.dataset_name)):
        raise RecipeError(f"--dataset_name {args.dataset_name}: no such folder; pass a Hub id (uoft-cs/cifar10) or "
                          f"a local folder that datasets.load_dataset reads")
    return datasets.load_dataset(args.dataset_name, args.dataset_config_name)


def _columns(args: CifarDataArgs, train: Any) -> tuple[str, str]:
    """The image and label columns, checked: named ones must exist, defaults must be found; else `RecipeError`."""
    cols, feats = train.column_names, train.features
    if args.image_column is not None:
        image_col = args.image_column
        if image_col not in cols:
            raise RecipeError(f"--image_column {image_col!r} is not a column of {args.dataset_name} (columns: {cols}); "
                              f"pass one of them")
    else:
        image_col = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        if image_col is None:
            raise RecipeError(f"{args.dataset_name} has no image column (columns: {cols}); pass --image_column")
    if args.label_column is not None:
        label_col = args.label_column
        if label_col not in cols:
            raise RecipeError(f"--label_column {label_col!r} is not a column of {args.dataset_name} (columns: {cols}); "
                              f"pass the column that holds the integer class labels")
    else:
        label_col = next((c for c in ("label", "fine_label", "labels") if c in cols), None)
        if label_col is None:
            raise RecipeError(f"{args.dataset_name} has no label column named label, fine_label or labels "
                              f"(columns: {cols}); pass --label_column")
    feature = feats[label_col]
    if not (isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value)
                                                         and feature.dtype.startswith(("int", "uint")))):
        raise RecipeError(f"--label_column {label_col!r} holds {feature}, not integer class labels; pass the column "
                          f"that does")
    return image_col, label_col


def load_cifar(args: CifarDataArgs, max_train: int | None = None, max_eval: int | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Raw train/evaluation splits (no transform), their columns, the number of classes, image shape and subsets.

    The evaluation split is the first of ``test``, ``validation``, ``valid`` present (:data:`EVAL_SPLITS`);
    it is called ``"test"`` below. ``max_train``/``max_eval`` rows are drawn at random with ``seed``
    (`random_subset`), never the first rows: a copy stored in class order would give one class. Returns
    ``{"train", "test", "eval_split", "image_col", "label_col", "num_classes", "image_shape", "subsets"}``;
    ``image_shape`` is ``(H, W)`` of the first training image (32x32 for CIFAR, 64x64 for TinyImageNet);
    ``subsets`` holds the rows and class counts of both splits (logged, and written to ``results.json``
    by the recipes).

    Raises:
        RecipeError: a missing local folder, split, image or label column (naming the option to pass).
    """
    raw = _load(args)
    eval_split = next((name for name in EVAL_SPLITS if name in raw), None)
    if "train" not in raw or eval_split is None:
        raise RecipeError(f"--dataset_name {args.dataset_name} has splits {list(raw)}; it needs 'train' and "
                          f"'test' (or 'validation', or 'valid')")
    train, test = raw["train"], raw[eval_split]
    image_col, label_col = _columns(args, train)
    if label_col not in test.column_names:
        raise RecipeError(f"--label_column {label_col!r} is missing from the test split of {args.dataset_name} "
                          f"(columns: {test.column_names})")
    feature = train.features[label_col]
    num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(max(train[label_col])) + 1
    n_train, n_test = len(train), len(test)
    if not n_train or not n_test:
        raise RecipeError(f"--dataset_name {args.dataset_name}: the train split has {n_train} rows and the "
                          f"{eval_split} split {n_test}; both need at least one")
    width, height = train[0][image_col].size
    train = random_subset(train, max_train, seed, "--max_train_samples")
    fraction = getattr(args, "validation_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise RecipeError(f"--validation_fraction must be in [0, 1); got {fraction}")
    if fraction > 0:
        n_heldout = round(fraction * len(train))
        if not 0 < n_heldout < len(train):
            raise RecipeError(f"--validation_fraction {fraction} of {len(train)} training rows holds out {n_heldout}; "
                              "it must leave at least one row on each side")
        perm = np.random.default_rng([seed, 0xD3]).permutation(len(train))
        test = train.select(np.sort(perm[:n_heldout]).tolist())
        train = train.select(np.sort(perm[n_heldout:]).tolist())
        eval_split, n_test = "heldout", len(test)
    test = random_subset(test, max_eval, seed, "--max_eval_samples")
    subsets = {**log_subset("train", train, label_col, n_train), **log_subset("test", test, label_col, n_test)}
    return {"train": train, "test": test, "eval_split": eval_split, "image_col": image_col, "label_col": label_col,
            "num_classes": num_classes, "image_shape": (height, width), "subsets": subsets}


def cifar_transforms(
    num_classes: int, image_size: int = 32, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    padding: int | None = None, resize: bool | None = None,
) -> tuple[Callable, Callable]:
    """(train, eval) transforms of a PIL image to a normalised ``(3, image_size, image_size)`` tensor.

    Train: resize, random crop with ``padding`` (default ``image_size // 8``: 4 at 32 px, the paper's CIFAR
    setting; the paper's TinyImageNet setting is 4 at 64 px, App. D.3) and horizontal flip. Eval: resize
    only. ``resize`` defaults to ``image_size != 32`` (inputs taken to be CIFAR's 32x32); pass ``False`` when
    the images already have ``image_size`` sides. ``mean``/``std`` default to :data:`CIFAR_STATS` for
    ``num_classes`` (CIFAR-10 for a count it does not list).

    Raises:
        ValueError: ``padding`` below 0.
    """
    if padding is not None and padding < 0:
        raise ValueError(f"cifar_transforms: padding must be >= 0; got {padding}")
    default_mean, default_std = CIFAR_STATS.get(num_classes, CIFAR_STATS[10])
    normalize = T.Normalize(mean or default_mean, std or default_std)
    resize = [T.Resize(image_size)] if (image_size != 32 if resize is None else resize) else []
    pad = image_size // 8 if padding is None else padding
    train = T.Compose([*resize, T.RandomCrop(image_size, padding=pad), T.RandomHorizontalFlip(),
                       T.ToTensor(), normalize])
    return train, T.Compose([*resize, T.ToTensor(), normalize])


def batch_transform(transform: Callable, image_col: str, label_col: str) -> Callable[[dict], dict]:
    """A ``with_transform`` function: a batch of PIL images -> ``pixel_values`` ``(3, H, W)`` each, and ``labels``."""

    def apply(batch: dict) -> dict:
        return {"pixel_values": [transform(im.convert("RGB")) for im in batch[image_col]], "labels": batch[label_col]}

    return apply


def views(data: dict[str, Any], train_tf: Callable, eval_tf: Callable) -> tuple[Any, Any, Any]:
    """(train with augmentation, the same rows with the eval transform for scoring/sharpness, test with eval)."""
    cols = data["image_col"], data["label_col"]
    train = data["train"].with_transform(batch_transform(train_tf, *cols))
    score = data["train"].with_transform(batch_transform(eval_tf, *cols))
    test = data["test"].with_transform(batch_transform(eval_tf, *cols))
    return train, score, test


def ood_prefix(num_classes: int) -> str:
    """The metric prefix of the corrupted sets: ``cifar10c``, ``cifar100c``, ``tinyimagenetc`` (200 classes) or ``ood``."""
    return {10: "cifar10c", 100: "cifar100c", 200: "tinyimagenetc"}.get(num_classes, "ood")


def wnid_class_to_idx(train: Any, label_col: str) -> dict[str, int] | None:
    """WordNet id -> label of the training split, when its label names are wnids (``n01443537``), else ``None``.

    ``zh-plus/tiny-imagenet``'s ``ClassLabel`` names are the 200 wnids, so a Tiny-ImageNet-C folder
    (``<wnid>`` sub-folders) gets the labels the model was trained with. ``None`` (integer labels without
    names, or names that are not wnids) lets `load_tinyimagenet_c` number the sorted wnid folders, which is
    the same numbering only when the training labels were made that way (torchvision ``ImageFolder``).
    """
    feature = train.features[label_col]
    names = getattr(feature, "names", None)
    if names and all(_WNID.fullmatch(str(n)) for n in names):
        return {str(n): i for i, n in enumerate(names)}
    return None


def iter_tinyimagenet_c(root: str, corruptions: Sequence[str] | None, severities: Iterable[int],
                        class_to_idx: dict[str, int] | None, image_column: str,
                        label_column: str) -> list[tuple[str, int, Any]]:
    """``[(corruption, severity, dataset)]`` of a Tiny-ImageNet-C folder (`load_tinyimagenet_c` for each set).

    ``corruptions=None`` means the 15 benchmark corruptions (those Tiny-ImageNet-C ships). Every set is
    listed at once (file paths only; images are decoded when evaluated), so a missing folder fails when
    this is called (the recipe calls it before training), not after an hour of evaluation.

    Raises:
        FileNotFoundError: ``root`` or one ``<corruption>/<severity>`` folder is missing (named).
        ValueError: an unknown corruption, a severity outside 1..5, a wnid not in ``class_to_idx``.
    """
    names, sevs = list(CORRUPTIONS if corruptions is None else corruptions), [int(s) for s in severities]
    return [(name, sev, load_tinyimagenet_c(root, name, sev, class_to_idx, image_column, label_column))
            for name in names for sev in sevs]


def corrupted_sets(args: CifarDataArgs, data: dict[str, Any], seed: int,
                   progress: bool = False) -> tuple[Iterable[tuple[str, int, Any]] | None, dict[str, Any]]:
    """``(sets, facts)``: the ``(corruption, severity, raw dataset)`` sets and what they were made of.

    ``sets`` comes from the published CIFAR-C folder (``--cifar_c_dir``, every image), the published
    Tiny-ImageNet-C folder (``--tinyimagenet_c_dir``, every image, labels by `wnid_class_to_idx`), is
    generated offline (``--corrupt_offline``: ``--corrupt_samples`` evaluation rows drawn at random with
    ``seed`` (the ``--subset_seed``), corrupted with noise seeded by it too, a progress bar per set when
    ``progress``), or is None (none asked). ``facts`` holds ``corrupt_rows`` and ``corrupt_class_counts``
    of the generated sets (logged); for Tiny-ImageNet-C, ``corrupt_source`` and ``corrupt_label_map``
    (``"wnid names"`` or ``"sorted folders"``); else nothing.

    Raises:
        RecipeError: both published folders given.
    """
    image_col, label_col = data["image_col"], data["label_col"]
    tiny_dir = getattr(args, "tinyimagenet_c_dir", None)
    if args.cifar_c_dir and tiny_dir:
        raise RecipeError(f"--cifar_c_dir {args.cifar_c_dir} and --tinyimagenet_c_dir {tiny_dir} are both set; "
                          f"pass the one that matches --dataset_name {args.dataset_name}")
    if args.cifar_c_dir:
        return iter_cifar_c(args.cifar_c_dir, args.corruptions or None, args.severities, image_column=image_col,
                            label_column=label_col), {}
    if tiny_dir:
        mapping = wnid_class_to_idx(data["train"], label_col)
        if mapping is None:
            logger.warning("The labels of %s are not named by WordNet ids: Tiny-ImageNet-C labels are the sorted wnid "
                           "folders' positions (torchvision ImageFolder's rule); check that the model was trained "
                           "with that numbering.", args.dataset_name)
        sets = iter_tinyimagenet_c(tiny_dir, args.corruptions or None, args.severities, mapping, image_col, label_col)
        return sets, {"corrupt_source": "tinyimagenet_c_dir",
                      "corrupt_label_map": "sorted folders" if mapping is None else "wnid names"}
    if not args.corrupt_offline:
        logger.warning("No --cifar_c_dir, --tinyimagenet_c_dir or --corrupt_offline: skipping the corrupted-data "
                       "evaluation.")
        return None, {}
    rows = random_subset(data["test"], args.corrupt_samples, seed, "--corrupt_samples")
    facts = log_subset("corrupt", rows, label_col, len(data["test"]))
    names = args.corruptions or list(corruptions_for((*data.get("image_shape", (32, 32)), 3)))
    logger.info("corrupted sets: %d corruptions x %d severities of %d images, generated as they are evaluated",
                len(names), len(args.severities), len(rows))
    return iter_corrupted_datasets(rows, image_col, names, args.severities, seed=seed, label_column=label_col,
                                   output_image_column=image_col, progress=progress), facts


def evaluate_corrupted(trainer: Any, eval_tf: Callable, data: dict[str, Any], sets: Iterable[tuple[str, int, Any]],
                       prefix: str) -> dict[str, float]:
    """`evaluate_corruptions` of ``trainer`` on ``sets`` (a logged phase, a bar over sets unless ``disable_tqdm``)."""
    with phase(f"evaluating on the corrupted sets ({prefix})"):
        return evaluate_corruptions(evaluate_on(trainer, eval_tf, data), sets, prefix=prefix,
                                    disable_tqdm=trainer.args.disable_tqdm)


def evaluate_on(trainer: Any, eval_tf: Callable, data: dict[str, Any]) -> Callable[[Any, str], dict]:
    """``evaluate_fn(raw_dataset, prefix)`` for `evaluate_corruptions`: ``trainer.evaluate`` with the eval transform."""
    to_eval = batch_transform(eval_tf, data["image_col"], data["label_col"])
    return lambda ds, prefix: trainer.evaluate(ds.with_transform(to_eval), metric_key_prefix=prefix)
