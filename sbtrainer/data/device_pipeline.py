"""Device-side image augmentation: uint8 images held on the accelerator, random crop + flip in batch.

On a GPU the CPU data path (decode, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
``Normalize`` row by row, each row under its own seeded global RNGs) can cost more than the training step.
:class:`DeviceImagePipeline` keeps the decoded training images as one ``(N, C, H, W)`` uint8 tensor on
the device (CIFAR-10's 50,000 images: 150 MB), lets the DataLoader carry only row indices
(:meth:`DeviceImagePipeline.index_dataset`), and on the device gathers a batch's rows, pads them with
zeros once, crops and flips every row at its own draws with one gather (:func:`crop_flip`), and
normalises: a handful of batched kernels per step, no per-row work.

Streams. A row's crop offsets and flip are a pure function of its augmentation seed (:meth:`draws`): in
training ``SharpBalanceTrainer`` passes each row's ``mix_seed(member_seed, epoch, row, TAG_AUGMENT)``
(`sbtrainer.sampling`), the seed the CPU path draws the row's augmentation under, so each member keeps
its own (member seed, epoch, row) stream, a resumed run replays exactly the same batches and member i
of an m-member run is augmented exactly as a 1-member run with member i's seed. The draws are not the
ones torchvision makes under the same seed (its Mersenne-Twister stream cannot be replayed in batch):
the distribution is the same (each of the ``2p + 1`` offsets per axis with probability ``1 / (2p + 1)``,
flip with probability 1/2, all independent), the individual images differ from the CPU path's.

Usage with the trainer::

    pipe = DeviceImagePipeline.from_dataset(raw_train, "img", mean=CIFAR_MEAN, std=CIFAR_STD,
                                            padding=4, device="cuda")
    train_ds = pipe.index_dataset(raw_train["label"])   # rows {"image_index": i, "labels": y}
    trainer = SharpBalanceTrainer(..., train_dataset=train_ds, score_dataset=train_ds,
                                  device_transform=pipe)

``datasets`` is never imported here: :meth:`DeviceImagePipeline.from_dataset` only calls the dataset's
methods, so this module imports on machines without it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
TAG_CROP_FLIP = 0xC0F1
"""XORed into a row's seed before hashing, so the crop/flip draws are a stream of their own."""


def _splitmix64(seeds: np.ndarray) -> np.ndarray:
    """The splitmix64 output for the state ``(seed ^ TAG_CROP_FLIP) + golden``, elementwise on uint64 (wrapping)."""
    z = (seeds ^ np.uint64(TAG_CROP_FLIP)) + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Per-row random-crop-with-zero-padding and horizontal flip of a batch: one pad and one gather.

    Row ``b`` of the result is ``pad(images[b], padding)[:, dy[b]:dy[b] + H, dx[b]:dx[b] + W]``, mirrored
    left-right where ``flip[b]`` is 1: what torchvision's ``RandomCrop((H, W), padding=padding)`` (constant
    fill 0) followed by ``RandomHorizontalFlip`` gives when its draws are ``top = dy``, ``left = dx``.
    The source pixel of output ``(b, c, r, x)`` is padded ``(b, c, dy + r, dx + x)``, or
    ``(b, c, dy + r, dx + W - 1 - x)`` when flipped; all are read by one ``gather`` over the flattened
    ``(H + 2p) * (W + 2p)`` plane.

    Args:
        images: ``(B, C, H, W)`` any dtype (uint8 here), on any device.
        dy, dx: ``(B,)`` int64 offsets in ``[0, 2 * padding]`` (vertical, horizontal), on ``images``' device.
        flip: ``(B,)`` int64 or bool, 1 = mirror.
        padding: zero padding on every side, ``>= 0``.

    Returns:
        ``(B, C, H, W)`` contiguous, of ``images``' dtype and device.

    Raises:
        ValueError: ``images`` not 4-D, or a draw tensor not ``(B,)``. Offsets are not range-checked (that
            would cost a device sync): one outside ``[0, 2 * padding]`` reads a wrong pixel or fails the gather.
    """
    if images.dim() != 4:
        raise ValueError(f"crop_flip: images must be (B, C, H, W); got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    for name, t in (("dy", dy), ("dx", dx), ("flip", flip)):
        if tuple(t.shape) != (b,):
            raise ValueError(f"crop_flip: {name} must have shape ({b},); got {tuple(t.shape)}")
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images.contiguous()
    wp = w + 2 * padding
    dev = images.device
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h                                                                # (B, H)
    cols = torch.where(flip.bool()[:, None], dx[:, None] + (w - 1 - ar_w), dx[:, None] + ar_w)  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)


class ImageIndexDataset(Dataset):
    """Rows ``{"image_index": i, "labels": y_i}`` (python ints): what the DataLoader carries for the pipeline.

    Args:
        labels: ``(N,)`` integer class labels, row i of the image store first.
        label_name: the key of the label in each row.

    ``deterministic = True``: its rows draw no random numbers, so a loader may skip seeding the global RNGs
    per row (the pipeline draws the augmentation from the seeds it is given).
    """

    deterministic: bool = True

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, label_name: str = "labels") -> None:
        if isinstance(labels, (torch.Tensor, np.ndarray)):
            labels = labels.tolist()
        self.labels = [int(y) for y in labels]
        self.label_name = label_name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, row: int) -> dict[str, int]:
        return {"image_index": int(row), self.label_name: self.labels[row]}

    def __getitems__(self, rows: list[int]) -> list[dict[str, int]]:
        return [self[r] for r in rows]


class DeviceImagePipeline:
    """Training-image augmentation on the device: random crop with zero padding + horizontal flip, normalise.

    A ``device_transform`` for ``SharpBalanceTrainer``: ``pipe(inputs, seeds)`` is called on each batch
    once it is on the device. ``columns = ("image_index",)`` is the dataset column it reads.

    Args:
        images: the decoded images, uint8 ``(N, C, H, W)`` (``layout="NCHW"``) or ``(N, H, W, C)``
            (``layout="NHWC"``, e.g. a stack of ``np.asarray(pil_image)``), tensor or ndarray.
        mean, std: per-channel normalisation of the ``[0, 1]`` image (``C`` values each, std > 0), as in
            ``torchvision.transforms.Normalize``.
        padding: zero padding of the random crop on every side (4: the paper's CIFAR augmentation,
            ``RandomCrop(32, padding=4)``); the crop keeps the image size; 0 disables the crop.
        flip: draw a horizontal flip with probability 1/2.
        channels_last: return ``pixel_values`` in ``torch.channels_last`` memory (same shape and values).
        layout: ``"NCHW"`` or ``"NHWC"``, the layout of ``images``.
        device: where the images are held (default: where ``images`` is).

    Raises:
        ValueError: ``images`` not uint8 or not 4-D, ``mean``/``std`` not one positive value per channel,
            ``padding`` negative, ``layout`` unknown.
    """

    columns: tuple[str, ...] = ("image_index",)

    def __init__(self, images: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float], *,
                 padding: int = 4, flip: bool = True, channels_last: bool = False, layout: str = "NCHW",
                 device: str | torch.device | None = None) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"DeviceImagePipeline: images must be a 4-D uint8 tensor or array; got "
                             f"{getattr(images, 'dtype', type(images).__name__)} of shape "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"DeviceImagePipeline: layout must be 'NCHW' or 'NHWC'; got {layout!r}")
        if layout == "NHWC":
            images = images.permute(0, 3, 1, 2)
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"DeviceImagePipeline: padding must be an int >= 0; got {padding!r}")
        channels = images.shape[1]
        mean_t, std_t = torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32)
        if mean_t.shape != (channels,) or std_t.shape != (channels,):
            raise ValueError(f"DeviceImagePipeline: mean and std need one value per channel ({channels}); got "
                             f"{len(mean_t)} and {len(std_t)}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"DeviceImagePipeline: std must be > 0 per channel; got {std_t.tolist()}")
        self.images = images.to(device if device is not None else images.device).contiguous()
        self.mean, self.std = mean_t.tolist(), std_t.tolist()
        self.padding, self.flip, self.channels_last = padding, bool(flip), bool(channels_last)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned_device = False

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset: Any, image_column: str | None = None, *, mean: Sequence[float],
                     std: Sequence[float], mode: str = "RGB", chunk_size: int = 2048,
                     device: str | torch.device | None = None, **kwargs: Any) -> DeviceImagePipeline:
        """Decode a HuggingFace ``datasets.Dataset``'s image column into the store, ``chunk_size`` rows per read.

        Rows are read through the dataset's plain format (any ``with_transform`` is bypassed), decoded
        images converted to ``mode`` (``"RGB"``, as the recipes' transforms do; ``"L"`` for one channel)
        and copied chunk by chunk into one ``(N, C, H, W)`` uint8 tensor on ``device``. Arrays in the
        column (``H x W`` or ``H x W x C``, uint8) are taken as they are.

        Args:
            dataset: a ``datasets.Dataset`` (or anything with ``len`` and ``dataset[a:b][column]``).
            image_column: the column; default the one whose feature is a ``datasets.Image``.
            mean, std, device, ``**kwargs``: as for the constructor (``padding``, ``flip``, ``channels_last``).

        Raises:
            ValueError: no image column found or named one missing, an empty dataset, images of different
                sizes or a non-uint8 array.
        """
        if image_column is None:
            features = getattr(dataset, "features", None) or {}
            image_column = next((k for k, f in features.items() if type(f).__name__ == "Image"), None)
            if image_column is None:
                raise ValueError(f"from_dataset: image_column not given and no Image feature among "
                                 f"{list(features)}; pass image_column")
        names = getattr(dataset, "column_names", None)
        if names is not None and image_column not in names:
            raise ValueError(f"from_dataset: image_column {image_column!r} is not a column (columns: {names})")
        if chunk_size < 1:
            raise ValueError(f"from_dataset: chunk_size must be >= 1; got {chunk_size}")
        raw = dataset
        if hasattr(raw, "select_columns"):
            raw = raw.select_columns([image_column])
        if hasattr(raw, "with_format"):
            raw = raw.with_format(None)  # plain decoded rows: no user transform
        n = len(raw)
        if n == 0:
            raise ValueError("from_dataset: the dataset has no rows")
        store: torch.Tensor | None = None
        for lo in range(0, n, chunk_size):
            chunk = _to_nhwc(raw[lo:lo + chunk_size][image_column], mode)
            if store is None:
                store = torch.empty((n, chunk.shape[3], chunk.shape[1], chunk.shape[2]), dtype=torch.uint8,
                                    device=device)
            if chunk.shape[1:] != (store.shape[2], store.shape[3], store.shape[1]):
                raise ValueError(f"from_dataset: images must all have one size; rows {lo}.. are "
                                 f"{chunk.shape[1:]} (H, W, C), the first {tuple(store.shape[2:])} x {store.shape[1]}")
            store[lo:lo + len(chunk)] = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(store.device)
        logger.info("DeviceImagePipeline: %d images %s held on %s (%.1f MB)", n, tuple(store.shape[1:]),
                    store.device, store.numel() / 2**20)
        return cls(store, mean, std, **kwargs)

    def to(self, device: str | torch.device) -> DeviceImagePipeline:
        """The pipeline with its images on ``device``: ``self`` when they are there already, else a copy."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        if self.images.device == device:
            return self
        moved = copy.copy(self)
        moved.images = self.images.to(device)
        moved._stats = {}
        moved._warned_device = False
        return moved

    def index_dataset(self, labels: Sequence[int] | np.ndarray | torch.Tensor,
                      label_name: str = "labels") -> ImageIndexDataset:
        """A map-style dataset of rows ``{"image_index": i, label_name: labels[i]}``, one per stored image.

        Raises:
            ValueError: ``len(labels)`` is not the number of stored images.
        """
        ds = ImageIndexDataset(labels, label_name)
        if len(ds) != len(self):
            raise ValueError(f"index_dataset: labels must have one value per stored image ({len(self)}); "
                             f"got {len(ds)}")
        return ds

    # -- properties --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={tuple(self.images.shape)} uint8 on {self.device}, "
                f"padding={self.padding}, flip={self.flip}, channels_last={self.channels_last})")

    # -- augmentation ------------------------------------------------------------------------------
    def draws(self, seeds: torch.Tensor | np.ndarray | Iterable[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
        """Each row's crop offsets and flip, a pure function of its seed: ``(dy, dx, flip)``, ``(B,)`` int64 CPU.

        ``z = splitmix64((seed ^ TAG_CROP_FLIP) + 0x9E3779B97F4A7C15)`` (the splitmix64 finaliser, a
        bijection of 64-bit words, computed in wrapping uint64 arithmetic; a negative int64 seed is read
        as its two's-complement word), then with ``n = 2 * padding + 1``: ``dy = z mod n``,
        ``dx = (z div n) mod n``, ``flip = (z div n^2) mod 2`` (0 when ``flip=False``). The triple is the
        mixed-radix digits of ``z mod 2n^2``; for ``z`` uniform on 64-bit words each of the ``2n^2``
        outcomes has probability ``1 / (2n^2)`` within a relative ``2n^2 / 2^64`` (< 1e-17 at padding 4):
        no modulo bias worth mentioning. ``dy``/``dx`` are the top/left offsets into the padded image.

        Args:
            seeds: ``(B,)`` integer seeds (int64 tensor on any device, ndarray or python ints in
                ``[-2^63, 2^64)``), e.g. ``mix_seed(member_seed, epoch, row, TAG_AUGMENT)``.

        Raises:
            ValueError: ``seeds`` not 1-D integers.
        """
        if isinstance(seeds, torch.Tensor):
            if seeds.is_floating_point() or seeds.is_complex() or seeds.dim() != 1:
                raise ValueError(f"draws: seeds must be a 1-D integer tensor; got {seeds.dtype} of shape "
                                 f"{tuple(seeds.shape)}")
            words = seeds.detach().cpu().to(torch.int64).numpy().astype(np.uint64)
        else:
            arr = seeds if isinstance(seeds, np.ndarray) else np.array([int(s) & (2**64 - 1) for s in seeds],
                                                                           dtype=np.uint64)
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise ValueError(f"draws: seeds must be 1-D integers; got {arr.dtype} of shape {arr.shape}")
            words = arr.astype(np.uint64)
        z = _splitmix64(words)
        n = np.uint64(2 * self.padding + 1)
        dy = z % n
        z = z // n
        dx = z % n
        flip = (z // n) % np.uint64(2) if self.flip else np.zeros_like(z)
        return tuple(torch.from_numpy(v.astype(np.int64)) for v in (dy, dx, flip))  # type: ignore[return-value]

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                                   torch.tensor(self.std, device=device).view(1, -1, 1, 1))
        return self._stats[device]

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the store, ``(B, C, H, W)`` uint8, on ``index``'s device."""
        if index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"DeviceImagePipeline: image_index must be a 1-D integer tensor; got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        target = index.device
        if target != self.images.device and not self._warned_device:
            self._warned_device = True
            logger.warning("DeviceImagePipeline: images are held on %s but the batch is on %s; every batch's "
                           "rows are copied over (call .to(%s) once)", self.images.device, target, target)
        rows = self.images.index_select(0, index.to(self.images.device, torch.int64))
        return rows.to(target)

    def __call__(self, inputs: Mapping[str, Any], seeds: torch.Tensor | None = None) -> dict[str, Any]:
        """Augment (``seeds`` given) or just normalise (``seeds=None``: the clean eval view) a batch.

        The images come from ``inputs["image_index"]`` (``(B,)`` rows of the store, gathered on the device)
        or, without it, from ``inputs["pixel_values"]`` when it is uint8 ``(B, C, H, W)`` (e.g. an eval set
        given as raw images). Float ``pixel_values`` (an already transformed batch) pass through unchanged
        when ``seeds`` is None.

        With ``seeds``: row b is cropped at the offsets and flipped as :meth:`draws` gives for ``seeds[b]``
        (:func:`crop_flip`, zero padding). Then ``pixel_values = (x / 255 - mean) / std`` in float32,
        the operations of ``ToTensor`` + ``Normalize`` in their order.

        Args:
            inputs: the batch (other keys are passed through).
            seeds: ``(B,)`` int64 augmentation seeds, or None.

        Returns:
            ``inputs`` with ``pixel_values`` ``(B, C, H, W)`` float32 on the batch's device
            (channels_last memory when ``channels_last``) and without ``image_index``.

        Raises:
            ValueError: neither ``image_index`` nor ``pixel_values``; float ``pixel_values`` with seeds
                (it cannot be augmented here); a batch with the wrong channel count; ``len(seeds) != B``.
        """
        out = dict(inputs)
        if "image_index" in out:
            x = self._gather(out.pop("image_index"))
        elif "pixel_values" in out:
            x = out["pixel_values"]
            if x.dtype != torch.uint8:
                if seeds is None:
                    return out
                raise ValueError(f"DeviceImagePipeline: pixel_values is {x.dtype}; only uint8 batches (or "
                                 f"image_index) can be augmented on the device")
            if x.dim() != 4 or x.shape[1] != len(self.mean):
                raise ValueError(f"DeviceImagePipeline: uint8 pixel_values must be (B, {len(self.mean)}, H, W); "
                                 f"got {tuple(x.shape)}")
        else:
            raise ValueError(f"DeviceImagePipeline: the batch needs image_index or pixel_values; got keys "
                             f"{sorted(out)}")
        if seeds is not None:
            dy, dx, flip = self.draws(seeds)
            if len(dy) != x.shape[0]:
                raise ValueError(f"DeviceImagePipeline: seeds must have one value per row ({x.shape[0]}); "
                                 f"got {len(dy)}")
            packed = torch.stack((dy, dx, flip)).to(x.device, non_blocking=True)
            x = crop_flip(x, packed[0], packed[1], packed[2], self.padding)
        mean, std = self._stats_on(x.device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt).float().div_(255).sub_(mean).div_(std)
        out["pixel_values"] = x.contiguous(memory_format=fmt)
        return out


def _to_nhwc(images: Sequence[Any], mode: str) -> np.ndarray:
    """A chunk of decoded images (PIL images or uint8 arrays) as one ``(n, H, W, C)`` uint8 array."""
    arrays = []
    for im in images:
        a = np.asarray(im.convert(mode)) if hasattr(im, "convert") else np.asarray(im)
        if a.dtype != np.uint8:
            raise ValueError(f"from_dataset: images must be uint8; got an array of {a.dtype}")
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    try:
        return np.stack(arrays)
    except ValueError as err:
        raise ValueError(f"from_dataset: images must all have one size; got {sorted({a.shape for a in arrays})} "
                         f"(H, W, C)") from err
