"""Shared pieces of the benchmarks: machine facts, data, models, trainers, memory probes, tables, JSON.

Not a benchmark itself. Every benchmark imports it as ``_common`` (run from the repo root as
``.venv/bin/python benchmarks/<name>.py``; the benchmarks folder is on ``sys.path`` then).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CIFAR_DIR = Path(os.environ.get("SBTRAINER_CIFAR10", "/work/shared/data/cifar10"))
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

if str(ROOT) not in sys.path:  # `import sbtrainer` without an install (the GPU machine runs from the repo root)
    sys.path.insert(0, str(ROOT))


# -- machine and output -------------------------------------------------------------------------------
def machine_info() -> dict:
    """Date, CPU, core count, thread count and library versions of this run."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name in ("transformers", "accelerate", "timm"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    return info


def write_result(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` (with machine facts) as ``<out_dir or benchmarks/results>/<name>.json``; return the path."""
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}")
    return path


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
    """A plain fixed-width table of ``rows`` (dicts) over ``columns``; floats to 3 significant figures."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}")
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max over samples of ``|got - ref| / (|ref| + 1e-3 mean|ref|)``: relative, without blowing up near-zero scores."""
    ref, got = ref.double(), got.double()
    return ((got - ref).abs() / (ref.abs() + 1e-3 * ref.abs().mean())).max().item()


# -- data ---------------------------------------------------------------------------------------------
def cifar_available() -> bool:
    return (CIFAR_DIR / "plain_text" / "train-00000-of-00001.parquet").is_file() or any(CIFAR_DIR.glob("**/*.parquet"))


def load_cifar_hf(split: str = "train"):
    """The HF ``datasets`` CIFAR-10 split from the local Hub-layout copy, or None (with a message) if absent."""
    if not cifar_available():
        print(f"CIFAR-10 not found at {CIFAR_DIR} (set SBTRAINER_CIFAR10); skipping what needs real images.")
        return None
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(str(CIFAR_DIR), split=split)


def cifar_tensors(n: int, seed: int = 0, real: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised CIFAR-10 training images ``(n, 3, 32, 32)`` float32, labels, and their source.

    Real images (the first ``n`` rows) when the local copy exists and ``real``; random CIFAR-shaped data otherwise.
    """
    ds = load_cifar_hf("train") if real else None
    if ds is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random"
    import numpy as np

    rows = ds.select(range(min(n, len(ds))))
    x = torch.from_numpy(np.stack([np.asarray(img.convert("RGB")) for img in rows["img"]])).permute(0, 3, 1, 2)
    x = (x.float() / 255 - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(rows["label"]), "cifar10"


def cifar_uint8(n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n`` CIFAR-10 rows as uint8 ``(n, 3, 32, 32)`` and int64 labels ``(n,)``, and their source.

    Read from the local copy's parquet with pyarrow and decoded with PIL (no ``datasets``: the lent GPU
    machines have none); random uint8 images where the copy is absent.
    """
    files = sorted((CIFAR_DIR / "plain_text").glob(f"{split}-*.parquet")) if CIFAR_DIR.is_dir() else []
    if not files:
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (n,), generator=g), "random")
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(files[0]).slice(0, n)
    images = [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in table.column("img").to_pylist()]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(table.column("label").to_pylist()), "cifar10"


class TensorDictDataset(Dataset):
    """Rows ``{"pixel_values": x[i], "labels": y[i]}`` of in-memory tensors (no decoding, no augmentation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


# -- models -------------------------------------------------------------------------------------------
def small_cnn(classes: int = 10, width: int = 32) -> nn.Module:
    """A small 3-block CNN for 32x32 inputs: (conv3x3-BN-ReLU-maxpool) x 3 with w, 2w, 4w channels, then a linear head."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 4 * 4, classes))


def model_factory(name: str, width: int | None = None) -> Callable[[], nn.Module]:
    """A builder of ``"cnn"`` (`small_cnn`) or ``"resnet18"`` (`sbtrainer.models.cifar_resnet`, CIFAR stem)."""
    if name == "cnn":
        return lambda: small_cnn(width=width or 32)
    if name == "resnet18":
        from sbtrainer.models import cifar_resnet

        return lambda: cifar_resnet("resnet18", num_classes=10, width=width or 64)
    raise ValueError(f"model must be 'cnn' or 'resnet18'; got {name!r}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- trainers -----------------------------------------------------------------------------------------
def make_trainer(method: str, factory: Callable[[], nn.Module], train: Dataset, *, members: int = 3,
                 batch_size: int = 128, max_steps: int = 1, rho: float = 0.05, callbacks: Sequence = (),
                 output_dir: str | None = None, **overrides):
    """A `SharpBalanceTrainer` as the paper's recipe sets it (SGD 0.1, momentum 0.9, wd 5e-4), CPU, no logging.

    ``scoring_start_epoch`` is set beyond the run so no scheduled scoring overwrites masks set by hand.
    """
    from transformers.trainer_callback import PrinterCallback

    from sbtrainer import EnsembleModel, SharpBalanceConfig, SharpBalanceTrainer

    kw = dict(output_dir=output_dir or tempfile.mkdtemp(prefix="sbbench-"), ensemble_method=method,
              num_members=members, per_device_train_batch_size=batch_size, max_steps=max_steps, rho=rho,
              learning_rate=0.1, optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4,
              lr_scheduler_type="constant", report_to="none", save_strategy="no", disable_tqdm=True,
              logging_strategy="no", dataloader_num_workers=0, seed=0, scoring_start_epoch=10**6,
              use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True)
    kw.update(overrides)
    args = SharpBalanceConfig(**kw)
    model = EnsembleModel.from_factory(lambda _seed: factory(), members, args.member_seeds)
    trainer = SharpBalanceTrainer(model=model, args=args, train_dataset=train, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # no end-of-train() metrics dict on stdout
    return trainer


def random_masks(members: int, rows: int, k: float, seed: int = 0) -> torch.Tensor:
    """SAM masks from independent random scores: member i's SAM set is the union of the others' top-k."""
    from sbtrainer.partition import partition

    g = torch.Generator().manual_seed(seed)
    return partition(torch.rand(members, rows, generator=g), k)


# -- memory -------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """High-water resident set size of this process since start or the last `reset_peak_rss`, MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux ``/proc/self/clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_worker(script: Path, argv: Sequence[str], timeout: float = 600) -> dict:
    """Run ``script argv`` in a fresh Python and parse the JSON object it prints on its last stdout line."""
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {script.name} {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
