"""Data for SharpBalance experiments: corrupted test sets (CIFAR-10-C style) and their loaders.

- :mod:`.corruptions`: the 15 corruptions of Hendrycks & Dietterich (2019), regenerated offline;
- :mod:`.corrupted_sets`: loaders for the published CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C and
  parquet copies, and :func:`evaluate_corruptions`, which pools per severity (paper Tables 2–4) and
  overall (paper Fig. 7);
- :mod:`.device_pipeline`: :class:`DeviceImagePipeline`, training images held as uint8 on the device with
  random crop + flip drawn per row from its (member seed, epoch, row) seed, applied in batch there.
"""

from .corrupted_sets import (
    EXTRA_CORRUPTIONS,
    KNOWN_CORRUPTIONS,
    evaluate_corruptions,
    iter_cifar_c,
    load_cifar_c,
    load_corrupted_parquet,
    load_tinyimagenet_c,
)
from .corruptions import (
    CORRUPTIONS,
    DETERMINISTIC_CORRUPTIONS,
    SEVERITIES,
    STAND_IN_CORRUPTIONS,
    corrupt,
    corruptions_for,
    iter_corrupted_datasets,
    make_corrupted_dataset,
)
from .device_pipeline import DeviceImagePipeline, ImageIndexDataset, crop_flip

__all__ = [
    "CORRUPTIONS",
    "DETERMINISTIC_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "KNOWN_CORRUPTIONS",
    "SEVERITIES",
    "STAND_IN_CORRUPTIONS",
    "DeviceImagePipeline",
    "ImageIndexDataset",
    "corrupt",
    "corruptions_for",
    "crop_flip",
    "evaluate_corruptions",
    "iter_cifar_c",
    "iter_corrupted_datasets",
    "load_cifar_c",
    "load_corrupted_parquet",
    "load_tinyimagenet_c",
    "make_corrupted_dataset",
]
