"""WRN-40-2 (paper Fig. 13) and TinyImageNet / Tiny-ImageNet-C (Fig. 7c/f, Table 4) in the CIFAR recipe.

The builder: exact parameter counts (by hand, layer by layer), shapes, save/rebuild, exact per-sample
scoring. The recipe: one tiny offline run of the WRN YAML (a WRN-10-1 by override) on made CIFAR-like
data, and one of the TinyImageNet YAML on made 64x64 data with 200 classes and a split named ``valid``,
evaluated on a made Tiny-ImageNet-C folder; each result is recomputed from the saved ensemble.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_recipes import (
    OOD,
    TINY,
    _check_reported_accuracy,
    _image_batch,
    _results,
    _write_folder,
    run_recipe,
)

from sbtrainer import EnsembleModel
from sbtrainer.models import (
    architecture_differences,
    build_from_recipe,
    cifar_wide_resnet,
    current_recipe,
)
from sbtrainer.scoring import per_sample_sharpness

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

WNIDS = [f"n{1000000 + 7 * i:08d}" for i in range(200)]  # 200 made WordNet ids, sorted like the real ones
TINY_CLASSES = (3, 42, 150, 199)  # the classes the made TinyImageNet rows use (of 200)


def wrn_parameters(depth: int, k: int, classes: int, in_chans: int = 3) -> int:
    """Parameters of WRN-depth-k counted by hand: 3x3 convs, 1x1 shortcuts, BatchNorm (2 per channel), the head."""
    n, widths = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
    total = in_chans * 16 * 9  # stem
    for g in range(3):
        for b in range(n):
            c_in, c_out = (widths[g] if b == 0 else widths[g + 1]), widths[g + 1]
            total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out  # bn1, conv1, bn2, conv2
            if b == 0 and (g > 0 or c_in != c_out):  # stride 2 or a width change: 1x1 shortcut
                total += c_in * c_out
    return total + 2 * widths[3] + widths[3] * classes + classes  # final bn, fc


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the builder


def test_wrn40_2_parameter_count_is_exact():
    assert wrn_parameters(40, 2, 10) == 2_243_546 and wrn_parameters(40, 2, 100) == 2_255_156
    assert _count(cifar_wide_resnet(40, 2, num_classes=10)) == 2_243_546  # "~2.2M" (Zagoruyko & Komodakis, Table)
    assert _count(cifar_wide_resnet(40, 2, num_classes=100)) == 2_255_156
    assert _count(cifar_wide_resnet(10, 1, num_classes=10)) == wrn_parameters(10, 1, 10) == 77_850
    assert _count(cifar_wide_resnet(16, 4, num_classes=200)) == wrn_parameters(16, 4, 200)


def test_wrn40_2_structure_and_shapes():
    """37 3x3 convs (stem + 2 per block x 18), 3 1x1 shortcuts, maps 32 -> 32/16/8, a 128-wide head."""
    torch.manual_seed(0)
    model = cifar_wide_resnet()  # WRN-40-2, 10 classes
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 37 and sum(c.kernel_size == (1, 1) for c in convs) == 3
    assert all(c.bias is None for c in convs)
    assert [len(g) for g in (model.group1, model.group2, model.group3)] == [6, 6, 6]
    shapes = {}
    hooks = [getattr(model, g).register_forward_hook(lambda m, i, o, g=g: shapes.__setitem__(g, tuple(o.shape)))
             for g in ("group1", "group2", "group3")]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10)
    assert shapes == {"group1": (2, 32, 32, 32), "group2": (2, 64, 16, 16), "group3": (2, 128, 8, 8)}
    assert (model.fc.in_features, model.fc.out_features) == (128, 10)
    assert cifar_wide_resnet(10, 1, 200)(torch.randn(1, 3, 64, 64)).shape == (1, 200)  # adaptive pooling at 64 px


def test_wrn_builder_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"^cifar_wide_resnet: depth must be 6n \+ 4 with n >= 1 .*; got 41$"):
        cifar_wide_resnet(41)
    with pytest.raises(ValueError, match=r"^cifar_wide_resnet: widen_factor must be an integer >= 1; got 0$"):
        cifar_wide_resnet(40, 0)
    with pytest.raises(ValueError, match=r"^cifar_wide_resnet: dropout must be in \[0, 1\); got 1.0$"):
        cifar_wide_resnet(40, 2, dropout=1.0)


def test_wrn_recipe_rebuilds_it_and_follows_a_new_head():
    torch.manual_seed(0)
    model = cifar_wide_resnet(10, 2, num_classes=10, dropout=0.3)
    recipe = current_recipe(model)
    assert recipe == {"builder": "cifar_wide_resnet",
                      "kwargs": {"depth": 10, "widen_factor": 2, "num_classes": 10, "dropout": 0.3, "in_chans": 3}}
    assert architecture_differences(model, build_from_recipe(recipe)) == []
    model.fc = torch.nn.Linear(model.fc.in_features, 3)
    recipe = current_recipe(model)
    assert recipe["kwargs"]["num_classes"] == 3
    assert architecture_differences(model, build_from_recipe(recipe)) == []


def test_wrn_hooks_scores_equal_the_one_sample_loop():
    """The fast per-sample scoring (one batched pass) is exact on the pre-activation blocks (shared pre-activation)."""
    torch.manual_seed(0)
    model = cifar_wide_resnet(10, 1, num_classes=5)
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(16, 3, 16, 16) * 2 + 1)
    x, y = torch.randn(7, 3, 16, 16), torch.randint(0, 5, (7,))
    model.eval()
    expected = []
    for i in range(7):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append(sum(p.grad.pow(2).sum() for p in model.parameters()).item())
    model.zero_grad()
    rows = [{"pixel_values": x[i], "labels": y[i]} for i in range(7)]
    got = per_sample_sharpness(model, rows, batch_size=4, method="hooks", progress=False)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- data made here


def _cifar_split(n: int, seed: int) -> datasets.Dataset:
    """32x32 RGB images, 10 classes, CIFAR-10's Hub columns (img, label)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    palette = np.random.default_rng(99).integers(30, 226, (10, 1, 1, 3))
    x = np.clip(palette[y] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return datasets.Dataset.from_dict({"img": list(x), "label": y.tolist()}, features=features)


def _tiny_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """64x64 RGB images whose mean colour depends on the class (uint8, (n, 64, 64, 3))."""
    palette = np.random.default_rng(98).integers(30, 226, (200, 1, 1, 3))
    noise = np.random.default_rng(seed).normal(0, 30, (len(labels), 64, 64, 3))
    return np.clip(palette[labels] + noise, 0, 255).astype(np.uint8)


def _tiny_split(n: int, seed: int, names: list[str] | None = WNIDS) -> datasets.Dataset:
    """Rows like zh-plus/tiny-imagenet's: image (64x64), label (ClassLabel of the 200 wnids)."""
    y = np.random.default_rng(seed).choice(TINY_CLASSES, n)
    label = datasets.ClassLabel(names=names) if names else datasets.ClassLabel(num_classes=200)
    features = datasets.Features({"image": datasets.Image(), "label": label})
    return datasets.Dataset.from_dict({"image": list(_tiny_images(y, seed)), "label": y.tolist()}, features=features)


TINY_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: valid
    path: data/valid-*
---
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A zh-plus/tiny-imagenet-like folder: splits train (24 rows) and valid (16 rows), declared by its README.

    The folder name is unique: ``datasets`` caches a folder whose README declares its splits under the
    folder's name and those declarations only (not the files), so a reused name would load an old copy.
    """
    root = tmp_path_factory.mktemp(f"tiny-imagenet-{uuid.uuid4().hex[:12]}")
    folder = _write_folder(root, {"train": _tiny_split(24, 0), "valid": _tiny_split(16, 1)})
    (root / "README.md").write_text(TINY_README)
    return folder


def _tiny_c_folder(root: Path) -> Path:
    """``<root>/<corruption>/<severity>/<wnid>/*.JPEG``: gaussian_noise x severities 1 and 5, 3 classes x 2 images."""
    for severity in (1, 5):
        for c in (3, 150, 199):
            folder = root / "gaussian_noise" / str(severity) / WNIDS[c]
            folder.mkdir(parents=True)
            for j, image in enumerate(_tiny_images(np.array([c, c]), seed=10 * severity + c)):
                Image.fromarray(image).save(folder / f"{WNIDS[c]}_{j}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return _write_folder(root, {"train": _cifar_split(48, 0), "test": _cifar_split(24, 1)})


# ----------------------------------------------------------------------------- data helpers of the recipe


def test_tiny_folder_loads_with_its_valid_split(tiny_dir):
    from cifar_data import CifarDataArgs, load_cifar, ood_prefix

    data = load_cifar(CifarDataArgs(dataset_name=tiny_dir))
    assert data["eval_split"] == "valid" and len(data["test"]) == 16
    assert (data["image_col"], data["label_col"], data["num_classes"]) == ("image", "label", 200)
    assert data["image_shape"] == (64, 64)
    assert ood_prefix(200) == "tinyimagenetc"


def test_tinyimagenet_c_labels_follow_the_training_label_names(tmp_path):
    """wnid names map each C folder to the trained label (3, 150, 199); without them: the sorted folders (0, 1, 2)."""
    from cifar_data import CifarDataArgs, corrupted_sets, wnid_class_to_idx
    from recipe_utils import RecipeError

    c_dir = str(_tiny_c_folder(tmp_path / "Tiny-ImageNet-C"))
    named = {"train": _tiny_split(4, 0), "image_col": "image", "label_col": "label"}
    args = CifarDataArgs(tinyimagenet_c_dir=c_dir, corruptions=["gaussian_noise"], severities=[1, 5])
    sets, facts = corrupted_sets(args, named, seed=0)
    assert facts == {"corrupt_source": "tinyimagenet_c_dir", "corrupt_label_map": "wnid names"}
    assert [(c, s, len(ds)) for c, s, ds in sets] == [("gaussian_noise", 1, 6), ("gaussian_noise", 5, 6)]
    assert sets[0][2]["label"] == [3, 3, 150, 150, 199, 199]
    assert sets[0][2][0]["image"].size == (64, 64)
    unnamed = {**named, "train": _tiny_split(4, 0, names=None)}
    assert wnid_class_to_idx(unnamed["train"], "label") is None
    sets, facts = corrupted_sets(args, unnamed, seed=0)
    assert facts["corrupt_label_map"] == "sorted folders" and sets[1][2]["label"] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(RecipeError, match=r"--cifar_c_dir x and --tinyimagenet_c_dir .* are both set"):
        corrupted_sets(CifarDataArgs(cifar_c_dir="x", tinyimagenet_c_dir=c_dir), named, seed=0)
    with pytest.raises(FileNotFoundError, match=r"Tiny-ImageNet-C set folder not found: .*gaussian_noise/3"):
        corrupted_sets(CifarDataArgs(tinyimagenet_c_dir=c_dir, corruptions=["gaussian_noise"], severities=[3]),
                       named, seed=0)


# ----------------------------------------------------------------------------- the recipe, tiny, offline


def test_wrn_yaml_runs_tiny(tmp_path, cifar10_dir):
    """The WRN-40-2 SharpBalance YAML with a WRN-10-1 (--arch override) and the device-side image pipeline: rho, k,
    Td from the YAML; saved and reloaded; reported accuracies recomputed from the saved ensemble."""
    from cifar_data import cifar_transforms

    out = tmp_path / "out"
    run_recipe("cifar_resnet.py", ["recipes/configs/wrn40_2_cifar10_sharpbalance.yaml", "--dataset_name", cifar10_dir,
                                   "--output_dir", str(out), "--arch", "wrn-10-1", "--lr_milestones", "1",
                                   "--device_augment", "on", *TINY, *OOD])
    results = _results(out)
    assert results["method"] == "sharpbalance" and results["arch"] == "wrn-10-1"
    assert results["device_augment"] is True and results["bf16"] is False  # the device pipeline, here on the CPU
    assert results["member_parameters"] == wrn_parameters(10, 1, 10) == 77_850
    assert (results["eval_split"], results["image_size"], results["num_classes"]) == ("test", 32, 10)
    assert results["scoring_epochs"] == [1] and results["corrupt_rows"] == 12 and "corrupt_source" not in results
    assert "cifar10c_all_ensemble_accuracy" in results and "cifar10c_severity_5_eir" in results

    meta = json.loads((out / "ensemble" / "ensemble_config.json").read_text())
    assert meta["member_kinds"] == ["module"] * 3 and meta["member_seeds"] == [13, 17, 27]
    assert meta["members"][0]["builder"] == {"builder": "cifar_wide_resnet", "kwargs": {
        "depth": 10, "widen_factor": 1, "num_classes": 10, "dropout": 0.0, "in_chans": 3}}
    assert (meta["config"]["rho"], meta["config"]["sam_fraction"], meta["config"]["scoring_start_epoch"]) == (0.2, 0.4, 1)
    ensemble = EnsembleModel.from_pretrained(out / "ensemble")
    batch, labels = _image_batch(cifar10_dir, cifar_transforms(10)[1], "label")
    _check_reported_accuracy(results, ensemble, batch, labels)


def test_tinyimagenet_yaml_runs_tiny_with_tinyimagenet_c(tmp_path, tiny_dir):
    """The TinyImageNet SharpBalance YAML (k 0.3) on 64x64 data with 200 classes and a 'valid' split, evaluated on a
    made Tiny-ImageNet-C folder: in-distribution and per-set OOD accuracies recomputed from the saved ensemble."""
    from cifar_data import cifar_transforms

    c_dir = _tiny_c_folder(tmp_path / "Tiny-ImageNet-C")
    out = tmp_path / "out"
    run_recipe("cifar_resnet.py", ["recipes/configs/tinyimagenet_sharpbalance.yaml", "--dataset_name", tiny_dir,
                                   "--output_dir", str(out), "--model_width", "4", "--lr_milestones", "1", *TINY,
                                   "--tinyimagenet_c_dir", str(c_dir), "--corruptions", "gaussian_noise",
                                   "--severities", "1", "5"])
    results = _results(out)
    assert (results["eval_split"], results["image_size"], results["num_classes"]) == ("valid", 64, 200)
    assert results["num_train_rows"] == 24 and results["num_test_rows"] == 16 and results["scoring_epochs"] == [1]
    assert (results["corrupt_source"], results["corrupt_label_map"]) == ("tinyimagenet_c_dir", "wnid names")
    meta = json.loads((out / "ensemble" / "ensemble_config.json").read_text())
    assert (meta["config"]["rho"], meta["config"]["sam_fraction"]) == (0.2, 0.3)  # Table 1, TinyImageNet
    assert meta["members"][0]["builder"]["kwargs"]["num_classes"] == 200

    ensemble = EnsembleModel.from_pretrained(out / "ensemble")
    eval_tf = cifar_transforms(200, 64, padding=4, resize=False)[1]
    valid = datasets.load_dataset(tiny_dir)["valid"]
    batch = {"pixel_values": torch.stack([eval_tf(im.convert("RGB")) for im in valid["image"]])}
    _check_reported_accuracy(results, ensemble, batch, torch.as_tensor(list(valid["label"])))
    per_set = {}
    for severity in (1, 5):
        files = sorted((c_dir / "gaussian_noise" / str(severity)).rglob("*.JPEG"))
        x = torch.stack([eval_tf(Image.open(f).convert("RGB")) for f in files])
        y = torch.as_tensor([WNIDS.index(f.parent.name) for f in files])
        with torch.no_grad():
            per_set[severity] = (ensemble(pixel_values=x).logits.argmax(-1) == y).double().mean().item()
        assert results[f"tinyimagenetc_gaussian_noise_{severity}_ensemble_accuracy"] == pytest.approx(per_set[severity],
                                                                                                      abs=1e-12)
        assert results[f"tinyimagenetc_severity_{severity}_ensemble_accuracy"] == pytest.approx(per_set[severity],
                                                                                                abs=1e-12)
    assert results["tinyimagenetc_all_ensemble_accuracy"] == pytest.approx(np.mean(list(per_set.values())), abs=1e-12)


def test_gpu_defaults_decide_and_refuse(tmp_path):
    """--device_augment / --mixed_precision: auto is off/fp32 on a CPU; 'on' with a resize and unknown values refused."""
    from cifar_resnet import CifarArgs, gpu_defaults
    from recipe_utils import RecipeError

    from sbtrainer import SharpBalanceConfig

    config = SharpBalanceConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert gpu_defaults(CifarArgs(), config, resize=False) == {"device_augment": False, "bf16": False,
                                                               "channels_last": False}
    assert gpu_defaults(CifarArgs(device_augment="on"), config, resize=False)["device_augment"] is True
    with pytest.raises(RecipeError, match="--device_augment on crops the stored images"):
        gpu_defaults(CifarArgs(device_augment="on"), config, resize=True)
    with pytest.raises(RecipeError, match=r"--device_augment must be one of \('auto', 'on', 'off'\); got 'yes'"):
        gpu_defaults(CifarArgs(device_augment="yes"), config, resize=False)
    with pytest.raises(RecipeError, match="--mixed_precision must be one of"):
        gpu_defaults(CifarArgs(mixed_precision="fp8"), config, resize=False)
    # --channels_last: opt-in on a CPU; refused below width 8 there (torch's CPU conv backward crashes)
    assert gpu_defaults(CifarArgs(channels_last="on", model_width=8), config, resize=False)["channels_last"] is True
    assert gpu_defaults(CifarArgs(channels_last="off"), config, resize=False)["channels_last"] is False
    with pytest.raises(RecipeError, match=r"^--channels_last on with --model_width 4 on a CPU: .* use --channels_last off"):
        gpu_defaults(CifarArgs(channels_last="on", model_width=4), config, resize=False)
    with pytest.raises(RecipeError, match=r"--channels_last must be one of \('auto', 'on', 'off'\); got 'yes'"):
        gpu_defaults(CifarArgs(channels_last="yes"), config, resize=False)


def test_channels_last_members_train_like_contiguous_ones(tmp_path):
    """Two steps of a width-8 member from the same init, NCHW vs channels_last (CPU): equal up to float rounding."""
    from helpers import DictDataset, make_args

    from sbtrainer import EnsembleModel, SharpBalanceTrainer
    from sbtrainer.models import cifar_resnet

    g = torch.Generator().manual_seed(0)
    data = DictDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    weights = []
    for channels_last in (False, True):
        args = make_args(tmp_path / str(channels_last), num_members=1, member_seeds=[3], max_steps=2,
                         ensemble_method="sam", rho=0.05, per_device_train_batch_size=8, learning_rate=0.1)
        ensemble = EnsembleModel.from_factory(lambda s: cifar_resnet(width=8), 1, [3])
        if channels_last:
            ensemble.to(memory_format=torch.channels_last)
        SharpBalanceTrainer(model=ensemble, args=args, train_dataset=data).train()
        weights.append([p.detach().contiguous() for p in ensemble.members[0].parameters()])
    assert ensemble.members[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
