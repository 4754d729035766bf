"""Tests for sbtrainer.data.corrupted_sets: loaders on tiny fake folders, and the pooled evaluation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from sbtrainer.data import corrupted_sets as S

N = 4  # images per severity in the fake CIFAR-C folder


def fake_cifar_c(root, corruptions=("fog", "snow"), labels_per_severity=False):
    """``<c>.npy`` of (5 * N, 32, 32, 3): image k of severity s is filled with 10 * s + k (+100 for snow)."""
    root.mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(corruptions):
        images = np.zeros((5 * N, 32, 32, 3), np.uint8)
        for s in range(1, 6):
            for k in range(N):
                images[(s - 1) * N + k] = 100 * j + 10 * s + k
        np.save(root / f"{name}.npy", images)
    labels = np.arange(N) if labels_per_severity else np.arange(5 * N) % 7  # distinct per severity
    np.save(root / "labels.npy", labels.astype(np.uint8))
    return root


# ----------------------------------------------------------------------------- CIFAR-C


def test_load_cifar_c_returns_the_severity_slice(tmp_path):
    root = fake_cifar_c(tmp_path / "CIFAR-10-C")
    ds = S.load_cifar_c(root, "fog", 3)
    assert ds.column_names == ["img", "label"]
    assert len(ds) == N
    assert ds["label"][:] == [(8 + k) % 7 for k in range(N)]  # rows 8..11 of labels.npy
    for k in range(N):
        img = ds[k]["img"]
        assert isinstance(img, Image.Image) and img.size == (32, 32)
        assert np.all(np.asarray(img) == 30 + k)
    snow5 = S.load_cifar_c(root, "snow", 5, image_column="image", label_column="labels")
    assert snow5.column_names == ["image", "labels"]
    assert np.all(np.asarray(snow5[N - 1]["image"]) == 100 + 50 + N - 1)
    assert snow5["labels"][:] == [(16 + k) % 7 for k in range(N)]


def test_load_cifar_c_accepts_labels_of_one_severity(tmp_path):
    root = fake_cifar_c(tmp_path / "c", labels_per_severity=True)
    assert S.load_cifar_c(root, "fog", 4)["label"][:] == [0, 1, 2, 3]


def test_load_cifar_c_errors_name_what_is_missing(tmp_path):
    root = fake_cifar_c(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-C file not found: .*c/frost\.npy"):
        S.load_cifar_c(root, "frost", 1)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-C folder not found: .*nowhere"):
        S.load_cifar_c(tmp_path / "nowhere", "fog", 1)
    (root / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        S.load_cifar_c(root, "fog", 1)
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        S.load_cifar_c(root, "fogg", 1)
    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5, got 6"):
        S.load_cifar_c(root, "fog", 6)
    np.save(root / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="expected 20 or 4 labels"):
        S.load_cifar_c(root, "fog", 1)


def test_iter_cifar_c_order_and_fails_fast(tmp_path):
    root = fake_cifar_c(tmp_path / "c")
    sets = list(S.iter_cifar_c(root, corruptions=["snow", "fog"], severities=(2, 5)))
    assert [(c, s) for c, s, _ in sets] == [("snow", 2), ("snow", 5), ("fog", 2), ("fog", 5)]
    assert np.all(np.asarray(sets[2][2][1]["img"]) == 21)
    gen = S.iter_cifar_c(root)  # the 15 benchmark corruptions: most files are missing
    with pytest.raises(FileNotFoundError, match=r"gaussian_noise\.npy"):
        next(gen)


# ----------------------------------------------------------------------------- Tiny-ImageNet-C


def fake_tinyimagenet_c(root):
    for wnid, n, value in [("n02", 1, 200), ("n01", 2, 100)]:
        folder = root / "fog" / "2" / wnid
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((64, 64, 3), value + i, np.uint8)).save(
                folder / f"{wnid}_{i}.JPEG", quality=95
            )
    (root / "fog" / "2" / "n01" / "notes.txt").write_text("not an image")
    return root


def test_load_tinyimagenet_c(tmp_path):
    root = fake_tinyimagenet_c(tmp_path / "Tiny-ImageNet-C")
    ds = S.load_tinyimagenet_c(root, "fog", 2)
    assert ds.column_names == ["image", "label"]
    assert ds["label"][:] == [0, 0, 1]  # sorted wnids: n01 -> 0, n02 -> 1
    first = ds[0]["image"]
    assert first.size == (64, 64) and abs(float(np.asarray(first).mean()) - 100) < 2
    assert abs(float(np.asarray(ds[2]["image"]).mean()) - 200) < 2
    mapped = S.load_tinyimagenet_c(root, "fog", 2, class_to_idx={"n01": 7, "n02": 3})
    assert mapped["label"][:] == [7, 7, 3]
    with pytest.raises(ValueError, match=r"\['n02'\] are not in class_to_idx"):
        S.load_tinyimagenet_c(root, "fog", 2, class_to_idx={"n01": 0})
    with pytest.raises(FileNotFoundError, match=r"Tiny-ImageNet-C set folder not found: .*fog/3"):
        S.load_tinyimagenet_c(root, "fog", 3)
    with pytest.raises(ValueError, match="unknown corruption"):
        S.load_tinyimagenet_c(root, "haze", 2)


# ----------------------------------------------------------------------------- parquet copies


def test_load_corrupted_parquet_filters_corruption_and_severity(tmp_path):
    import datasets

    rows = [(c, s, k) for c in ("fog", "snow") for s in (1, 2, 3) for k in range(3)]
    ds = datasets.Dataset.from_dict(
        {
            "image": [np.full((4, 4), 10 * s + k, np.uint8) for _, s, k in rows],
            "label": [k for _, _, k in rows],
            "corruption": [c for c, _, _ in rows],
            "severity": [s for _, s, _ in rows],
            "uid": [f"{c}-{s}-{k}" for c, s, k in rows],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.Value("int64"),
                "corruption": datasets.Value("string"),
                "severity": datasets.Value("int64"),
                "uid": datasets.Value("string"),
            }
        ),
    )
    folder = tmp_path / "copy" / "data"
    folder.mkdir(parents=True)
    ds.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    ds.select(range(3)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    cache = str(tmp_path / "cache")
    one = S.load_corrupted_parquet(folder / "test-00000-of-00001.parquet", "snow", 2, cache_dir=cache)
    assert one["uid"][:] == ["snow-2-0", "snow-2-1", "snow-2-2"]
    assert np.all(np.asarray(one[1]["image"]) == 21)
    from_folder = S.load_corrupted_parquet(tmp_path / "copy", "fog", 3, cache_dir=cache)  # test-* files only
    assert from_folder["uid"][:] == ["fog-3-0", "fog-3-1", "fog-3-2"]
    with pytest.raises(ValueError, match=r"corruption 'frost' not found .* present: \['fog', 'snow'\]"):
        S.load_corrupted_parquet(folder, "frost", 1, cache_dir=cache)
    with pytest.raises(ValueError, match="no rows with corruption='fog' and severity=5"):
        S.load_corrupted_parquet(folder, "fog", 5, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="parquet file or folder not found"):
        S.load_corrupted_parquet(tmp_path / "missing.parquet", "fog", 1)
    with pytest.raises(ValueError, match="column 'level' not found"):
        S.load_corrupted_parquet(folder, "fog", 1, severity_column="level", cache_dir=cache)


# ----------------------------------------------------------------------------- pooled evaluation


def test_evaluate_corruptions_pools_per_severity_and_overall():
    acc = {
        ("fog", 1): 0.9,
        ("fog", 2): 0.7,
        ("snow", 1): 0.8,
        ("snow", 2): 0.5,
        ("blur", 1): 0.6,
        ("blur", 2): 0.3,
    }
    calls = []

    def evaluate_fn(dataset, prefix):
        calls.append((dataset, prefix))
        c, s = dataset
        return {
            f"{prefix}_ensemble_accuracy": acc[(c, s)],
            f"{prefix}_member_accuracy": acc[(c, s)] - 0.1,
            f"{prefix}_runtime": 2.5,
            "epoch": 3.0,
        }

    sets = [(c, s, (c, s)) for (c, s) in acc]
    out = S.evaluate_corruptions(evaluate_fn, sets, prefix="c10c")
    assert calls[0] == (("fog", 1), "c10c_fog_1")
    assert out["c10c_snow_2_ensemble_accuracy"] == 0.5  # per-set keys kept
    assert out["c10c_fog_1_runtime"] == 2.5
    assert out["c10c_severity_1_ensemble_accuracy"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    assert out["c10c_severity_2_ensemble_accuracy"] == pytest.approx((0.7 + 0.5 + 0.3) / 3)
    assert out["c10c_all_ensemble_accuracy"] == pytest.approx(3.8 / 6)
    assert out["c10c_severity_2_member_accuracy"] == pytest.approx((0.6 + 0.4 + 0.2) / 3)
    assert out["c10c_all_member_accuracy"] == pytest.approx(3.2 / 6)
    assert "c10c_all_runtime" not in out and "c10c_all_epoch" not in out
    pooled = {k for k in out if "_severity_" in k or "_all_" in k}
    assert pooled == {
        "c10c_severity_1_ensemble_accuracy",
        "c10c_severity_2_ensemble_accuracy",
        "c10c_all_ensemble_accuracy",
        "c10c_severity_1_member_accuracy",
        "c10c_severity_2_member_accuracy",
        "c10c_all_member_accuracy",
    }
    with pytest.raises(ValueError, match=r"\('fog', 1\) appears twice"):
        S.evaluate_corruptions(evaluate_fn, sets + sets[:1], prefix="c10c")
    with pytest.raises(ValueError, match="must return a dict"):
        S.evaluate_corruptions(lambda ds, p: 0.5, sets)


def test_evaluate_corruptions_on_loaded_sets(tmp_path):
    """End to end on the fake folder: the 'accuracy' of each set is its mean pixel value / 100."""
    root = fake_cifar_c(tmp_path / "c")

    def evaluate_fn(ds, prefix):
        return {f"{prefix}_brightness": float(np.mean([np.asarray(im).mean() for im in ds["img"]])) / 100}

    out = S.evaluate_corruptions(evaluate_fn, S.iter_cifar_c(root, ["fog", "snow"], (1, 5)), prefix="c")
    # fog s: mean(10 s + k) = 10 s + 1.5; snow adds 100.
    assert out["c_severity_1_brightness"] == pytest.approx(((11.5) + (111.5)) / 2 / 100)
    assert out["c_all_brightness"] == pytest.approx((11.5 + 51.5 + 111.5 + 151.5) / 4 / 100)
