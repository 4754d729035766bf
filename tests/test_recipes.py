"""Every recipe end to end, tiny, through `accelerate launch` in a subprocess, on data made here (CPU, offline).

Each run goes a few steps past Td (SharpBalance scores once), evaluates in distribution and on a
corrupted set generated offline, measures sharpness, and saves the ensemble. The checks reload the
saved ensemble and recompute the reported accuracies from it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from sbtrainer import EnsembleModel
from sbtrainer.metrics import ensemble_nll

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE = Path(sys.executable).with_name("accelerate")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--num_train_epochs", "2", "--scoring_start_epoch", "1", "--per_device_train_batch_size", "16",
        "--sharpness_batches", "2", "--sharpness_steps", "2", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--logging_steps", "1"]
OOD = ["--corrupt_offline", "true", "--corrupt_samples", "12", "--corruptions", "gaussian_noise", "contrast",
       "--severities", "1", "5"]
ENSEMBLE_KEYS = ["ensemble_accuracy", "member_accuracy", "member_0_accuracy", "eir", "der", "variance", "kl",
                 "ensemble_nll", "ensemble_ece", "ensemble_brier"]

sys.path.insert(0, str(RECIPES))


# ----------------------------------------------------------------------------- data made here


def _image_split(n: int, classes: int, label_col: str, seed: int) -> datasets.Dataset:
    """32x32 RGB images whose mean colour depends on the class (learnable), as a Hub-like CIFAR split."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    palette = np.random.default_rng(99).integers(30, 226, (classes, 1, 1, 3))
    x = np.clip(palette[y] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    features = datasets.Features({"img": datasets.Image(), label_col: datasets.ClassLabel(num_classes=classes)})
    return datasets.Dataset.from_dict({"img": list(x), label_col: y.tolist()}, features=features)


def _write_folder(root: Path, splits: dict[str, datasets.Dataset]) -> str:
    (root / "data").mkdir(parents=True)
    for name, ds in splits.items():
        ds.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return str(root)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return _write_folder(root, {"train": _image_split(48, 10, "label", 0), "test": _image_split(24, 10, "label", 1)})


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    return _write_folder(root, {"train": _image_split(48, 100, "fine_label", 2),
                                "test": _image_split(20, 100, "fine_label", 3)})


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    """An MRPC-like folder: sentence pairs (paraphrase = shared words), labels 0/1, GLUE's columns."""
    rng = np.random.default_rng(4)
    words = [f"w{i}" for i in range(60)]

    def split(n):
        s1, s2, y = [], [], []
        for _ in range(n):
            a = list(rng.choice(words, 8))
            label = int(rng.integers(0, 2))
            b = a[:6] + list(rng.choice(words, 2)) if label else list(rng.choice(words, 8))
            s1.append(" ".join(a))
            s2.append(" ".join(b))
            y.append(label)
        features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
                                      "idx": datasets.Value("int32")})
        return datasets.Dataset.from_dict({"sentence1": s1, "sentence2": s2, "label": y, "idx": list(range(n))},
                                          features=features)

    return _write_folder(tmp_path_factory.mktemp("mrpc"), {"train": split(48), "validation": split(24)})


# ----------------------------------------------------------------------------- running and checking


def run_recipe(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch --num_processes 1 --cpu recipes/<script> <args>`` offline; fails the test with its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(ACCELERATE), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--cpu", str(RECIPES / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# results")
    return results


def _assert_pngs(out: Path, names: list[str]) -> None:
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name


def _accuracies(ensemble: EnsembleModel, batch: dict, labels: torch.Tensor) -> tuple[float, list[float]]:
    with torch.no_grad():
        out = ensemble(**batch)
    ens = (out.logits.argmax(-1) == labels).double().mean().item()
    members = [(out.member_logits[:, i].argmax(-1) == labels).double().mean().item() for i in range(ensemble.num_members)]
    return ens, members


def _image_batch(folder: str, transform, label_col: str) -> tuple[dict, torch.Tensor]:
    test = datasets.load_dataset(folder)["test"]
    x = torch.stack([transform(im.convert("RGB")) for im in test["img"]])
    return {"pixel_values": x}, torch.as_tensor(list(test[label_col]))


def _check_reported_accuracy(results: dict, ensemble: EnsembleModel, batch: dict, labels: torch.Tensor) -> None:
    ens, members = _accuracies(ensemble, batch, labels)
    assert results["eval_ensemble_accuracy"] == pytest.approx(ens, abs=1e-12)
    for i, acc in enumerate(members):
        assert results[f"eval_member_{i}_accuracy"] == pytest.approx(acc, abs=1e-12)


# ----------------------------------------------------------------------------- the recipes


def test_cifar_resnet_recipe_from_the_paper_yaml(tmp_path, cifar10_dir):
    """The paper's YAML with tiny overrides: SharpBalance, rho 0.2, k 0.4 and the seeds come from the YAML."""
    from cifar_data import cifar_transforms

    out = tmp_path / "out"
    run_recipe("cifar_resnet.py", ["recipes/configs/cifar10_sharpbalance.yaml", "--dataset_name", cifar10_dir,
                                   "--output_dir", str(out), "--model_width", "4", "--lr_milestones", "1", *TINY, *OOD])
    results = _results(out)
    assert results["method"] == "sharpbalance" and results["num_train_rows"] == 48
    train_labels = datasets.load_dataset(cifar10_dir)["train"]["label"]
    assert results["train_class_counts"] == {str(c): train_labels.count(c) for c in sorted(set(train_labels))}
    assert results["torch_num_threads"] == 1 and results["env_OMP_NUM_THREADS"] == "1"  # as run_recipe launches it
    assert results["corrupt_rows"] == 12 and sum(results["corrupt_class_counts"].values()) == 12
    assert results["scoring_epochs"] == [1]
    assert all(0 < results[f"member_{i}_sam_set_fraction"] < 1 for i in range(3))
    for key in ENSEMBLE_KEYS:
        assert {f"eval_{key}", f"cifar10c_all_{key}", f"cifar10c_severity_5_{key}"} <= set(results), key
    assert "cifar10c_gaussian_noise_1_ensemble_accuracy" in results and "cifar10c_severity_3_eir" not in results
    assert results["sharpness"] == pytest.approx(np.mean([results[f"sharpness_member_{i}"] for i in range(3)]))
    _assert_pngs(out, ["member_vs_ensemble.png", "member_vs_ensemble_ood.png", "sharpness_diversity.png"])
    assert "## Per severity" in (out / "summary.md").read_text()

    ensemble = EnsembleModel.from_pretrained(out / "ensemble")
    meta = json.loads((out / "ensemble" / "ensemble_config.json").read_text())
    assert meta["member_seeds"] == [13, 17, 27] and meta["member_kinds"] == ["timm"] * 3
    assert meta["config"]["rho"] == 0.2 and meta["config"]["sam_fraction"] == 0.4
    assert meta["members"][0]["builder"]["kwargs"]["width"] == 4
    batch, labels = _image_batch(cifar10_dir, cifar_transforms(10)[1], "label")
    _check_reported_accuracy(results, ensemble, batch, labels)


def test_cifar_resnet_recipe_under_two_processes(tmp_path, cifar10_dir):
    """``torchrun --nproc_per_node 2`` (gloo): the run exits cleanly and the reported in-distribution metrics
    are those of the saved ensemble on every evaluation row exactly once (23 rows: uneven 12/11 shards)."""
    from cifar_data import cifar_transforms

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(RECIPES / "cifar_resnet.py"), "recipes/configs/cifar10_sharpbalance.yaml", "--dataset_name", cifar10_dir,
           "--output_dir", str(out), "--model_width", "4", "--lr_milestones", "1", "--max_eval_samples", "23", *TINY,
           "--corruptions", "contrast", "--severities", "5", "--corrupt_samples", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = _results(out)
    assert results["num_train_rows"] == 48 and results["scoring_epochs"] == [1]
    assert results["num_processes"] == 2 and results["torch_num_threads"] == 1
    batch, labels = _image_batch(cifar10_dir, cifar_transforms(10)[1], "label")
    rows = np.sort(np.random.default_rng(0).permutation(24)[:23])  # --max_eval_samples 23: drawn with --subset_seed 0
    batch, labels = {"pixel_values": batch["pixel_values"][rows]}, labels[rows]
    assert results["test_rows"] == 23
    assert results["test_class_counts"] == {str(c): int((labels == c).sum()) for c in labels.unique().tolist()}
    ensemble = EnsembleModel.from_pretrained(out / "ensemble")
    _check_reported_accuracy(results, ensemble, batch, labels)
    reduction = ensemble.reduction  # what the saved ensemble reduces with (its one home)
    with torch.no_grad():
        logits = ensemble(**batch).member_logits
    assert results["eval_ensemble_nll"] == pytest.approx(ensemble_nll(logits, labels, reduction), rel=1e-5)


def test_vit_recipe_from_flags(tmp_path, cifar100_dir):
    """Flags only (no YAML): a tiny random ViT at 32 px on a CIFAR-100-like folder (label column fine_label)."""
    from cifar_data import cifar_transforms

    out = tmp_path / "out"
    run_recipe("vit_cifar100.py", ["--dataset_name", cifar100_dir, "--output_dir", str(out), "--pretrained", "false",
                                   "--image_size", "32", "--model_kwargs", '{"depth": 1, "embed_dim": 24, "num_heads": 2}',
                                   "--ensemble_method", "sam", "--rho", "0.1", "--optim", "sgd", "--optim_args",
                                   "momentum=0.9", "--learning_rate", "0.01", *TINY, *OOD])
    results = _results(out)
    assert results["method"] == "sam" and "scoring_epochs" not in results
    assert "cifar100c_all_ensemble_accuracy" in results and "cifar100c_severity_1_der" in results
    _assert_pngs(out, ["member_vs_ensemble.png", "member_vs_ensemble_ood.png", "sharpness_diversity.png"])
    ensemble = EnsembleModel.from_pretrained(out / "ensemble")
    cfg = ensemble.members[0].pretrained_cfg
    assert ensemble.members[0].patch_embed.img_size == (32, 32) and len(ensemble.members[0].blocks) == 1
    batch, labels = _image_batch(cifar100_dir, cifar_transforms(100, 32, cfg["mean"], cfg["std"])[1], "fine_label")
    _check_reported_accuracy(results, ensemble, batch, labels)


def test_albert_recipe_tiny_offline(tmp_path, mrpc_dir):
    """The ALBERT YAML with --tiny: a random ALBERT and a word-level tokenizer; GLUE metrics from sklearn offline."""
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    run_recipe("albert_mrpc.py", ["recipes/configs/albert_mrpc_sharpbalance.yaml", "--tiny", "true", "--dataset_name",
                                  mrpc_dir, "--max_seq_length", "24", "--learning_rate", "0.001", "--output_dir",
                                  str(out), "--eval_strategy", "no", *TINY])
    results = _results(out)
    assert results["glue_metric_source"] == "sklearn" and results["scoring_epochs"] == [1]
    assert results["eval_glue_accuracy"] == pytest.approx(results["eval_ensemble_accuracy"], abs=1e-12)
    _assert_pngs(out, ["member_vs_ensemble.png", "sharpness_diversity.png"])

    folder = out / "ensemble"
    ensemble = EnsembleModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    valid = datasets.load_dataset(mrpc_dir)["validation"]
    enc = tokenizer(list(valid["sentence1"]), list(valid["sentence2"]), truncation=True, max_length=24,
                    padding="max_length", return_tensors="pt")
    assert "token_type_ids" in enc  # sentence-pair segments survive the save
    batch = dict(enc)
    labels = torch.as_tensor(list(valid["label"]))
    _check_reported_accuracy(results, ensemble, batch, labels)
    with torch.no_grad():
        preds = ensemble(**batch).logits.argmax(-1)
        alone = AutoModelForSequenceClassification.from_pretrained(folder, subfolder="member_2").eval()
        assert torch.equal(alone(**batch).logits, ensemble.members[2](**batch).logits)
    assert results["eval_glue_f1"] == pytest.approx(f1_score(labels.numpy(), preds.numpy()), abs=1e-12)


def test_tradeoff_recipe(tmp_path, cifar10_dir):
    """A 2-point SAM rho sweep with one SharpBalance point: points, slope, four scatter plots, three ensembles."""
    out = tmp_path / "out"
    run_recipe("tradeoff.py", ["--dataset_name", cifar10_dir, "--output_dir", str(out), "--model_width", "4",
                               "--lr_milestones", "1", "--rhos", "0.02", "0.5", "--sharpbalance_rhos", "0.5",
                               "--sam_fraction", "0.4", *TINY, *OOD])
    results = _results(out)
    points = results["points"]
    assert [(p["method"], p["rho"]) for p in points] == [("sam", 0.02), ("sam", 0.5), ("sharpbalance", 0.5)]
    for p in points:
        assert p["measured_on"] == "cifar10c_all" and p["sharpness"] >= 0
        assert set(p) >= {"der", "variance", "kl", "eir", "member_accuracy", "ensemble_accuracy", "id_ensemble_accuracy"}
    assert isinstance(results["sam_slope_log_der_vs_log_sharpness"], (float, type(None)))
    assert "| sharpbalance ρ=0.5 |" in (out / "tradeoff.md").read_text()
    _assert_pngs(out, ["tradeoff_der.png", "tradeoff_variance.png", "tradeoff_kl.png", "tradeoff_der_member_ood.png"])
    names = sorted(p.name for p in (out / "ensemble").iterdir())
    assert names == ["sam_rho0.02", "sam_rho0.5", "sharpbalance_rho0.5"]
    meta = json.loads((out / "ensemble" / "sam_rho0.5" / "ensemble_config.json").read_text())
    assert meta["method"] == "sam" and meta["config"]["rho"] == 0.5
    assert meta["metrics"]["der"] == pytest.approx(points[1]["der"])
    assert EnsembleModel.from_pretrained(out / "ensemble" / "sharpbalance_rho0.5").num_members == 3
