"""Tests for sbtrainer.data.corruptions: severity ordering, determinism, published quirks, bad input."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from scipy import ndimage

from sbtrainer.data import corruptions as C


def structured_images(n: int = 100, size: int = 32, seed: int = 123) -> list[np.ndarray]:
    """``n`` uint8 (size, size, 3) images: a two-colour linear gradient plus two flat shapes (disc / box)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        start, end = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        angle = rng.uniform(0, np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / np.ptp(t)
        img = start * (1 - t[..., None]) + end * t[..., None]
        for _ in range(2):
            colour = rng.uniform(0, 1, 3)
            cx, cy = rng.uniform(0.2, 0.8, 2)
            r = rng.uniform(0.1, 0.3)
            if rng.random() < 0.5:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            else:
                mask = (abs(xx - cx) < r) & (abs(yy - cy) < 0.6 * r)
            img[mask] = colour
        images.append((img * 255).astype(np.uint8))
    return images


def digit_images(n: int = 100) -> list[np.ndarray]:
    """The first ``n`` sklearn 8×8 digits as uint8 (H, W) (values 0..16 scaled by 16, clipped)."""
    from sklearn.datasets import load_digits

    return [np.clip(d * 16, 0, 255).astype(np.uint8) for d in load_digits().images[:n]]


def mean_abs_error(images: list[np.ndarray], name: str, severity: int) -> float:
    """Mean |corrupted − clean| (uint8 units) over ``images``, image i seeded with i."""
    errs = [
        np.abs(C.corrupt(im, name, severity, np.random.default_rng(i)).astype(float) - im).mean()
        for i, im in enumerate(images)
    ]
    return float(np.mean(errs))


RGB = structured_images()
GRAY = digit_images()


# ----------------------------------------------------------------------------- severity ordering


@pytest.mark.parametrize("name", [n for n in C.CORRUPTIONS if n != "elastic_transform"])
def test_severity_5_distorts_more_than_severity_1_rgb(name):
    sev1, sev5 = mean_abs_error(RGB, name, 1), mean_abs_error(RGB, name, 5)
    assert sev5 > sev1 > 0, (name, sev1, sev5)


def test_elastic_transform_follows_the_published_table():
    """CIFAR-10-C's elastic table shrinks the random affine (0.08 → 0.03 of the side) while it grows the
    local elastic field (alpha 0 → 0.1 of the side): on 32×32 RGB the pixel error therefore FALLS with
    severity (measured 7.6 → 4.5), while the non-affine part, seen as the departure of a linear ramp
    from a plane (an affine warp keeps a ramp planar), RISES."""
    sev1, sev5 = mean_abs_error(RGB, "elastic_transform", 1), mean_abs_error(RGB, "elastic_transform", 5)
    assert sev1 > sev5 > 0
    yy, xx = np.mgrid[0:32, 0:32].astype(float)
    ramp = np.repeat((4 * xx + 2 * yy)[..., None], 3, axis=2).astype(np.uint8)  # values 0..186

    def plane_residual(severity: int) -> float:
        res = []
        for seed in range(20):
            out = C.corrupt(ramp, "elastic_transform", severity, np.random.default_rng(seed))[8:24, 8:24, 0]
            design = np.stack([xx[8:24, 8:24].ravel(), yy[8:24, 8:24].ravel(), np.ones(256)], axis=1)
            coef, *_ = np.linalg.lstsq(design, out.ravel().astype(float), rcond=None)
            res.append(np.sqrt(np.mean((design @ coef - out.ravel()) ** 2)))
        return float(np.mean(res))

    local1, local5 = plane_residual(1), plane_residual(5)
    assert local1 < 0.6  # uint8 truncation only
    assert local5 > 3 * local1


@pytest.mark.parametrize("name", C.corruptions_for((8, 8)))
def test_severity_5_distorts_more_than_severity_1_gray_digits(name):
    sev1, sev5 = mean_abs_error(GRAY, name, 1), mean_abs_error(GRAY, name, 5)
    assert sev5 > sev1, (name, sev1, sev5)


def test_corruptions_for_small_and_large_images():
    small = C.corruptions_for((8, 8))
    assert set(C.CORRUPTIONS) - set(small) == {"motion_blur", "snow"}
    assert len(small) == 13
    assert C.corruptions_for((32, 32, 3)) == C.CORRUPTIONS
    assert C.corruptions_for((16, 16)) == C.CORRUPTIONS
    with pytest.raises(ValueError, match="image_shape"):
        C.corruptions_for((32, 32, 4))


# ----------------------------------------------------------------------------- determinism, dtype, shape


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_deterministic_under_a_seed_and_shape_preserved(name):
    img = RGB[0]
    a = C.corrupt(img, name, 3, np.random.default_rng(7))
    b = C.corrupt(img, name, 3, np.random.default_rng(7))
    c = C.corrupt(img, name, 3, np.random.default_rng(8))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    if name in C.DETERMINISTIC_CORRUPTIONS:
        np.testing.assert_array_equal(a, c)
    else:
        assert np.any(a != c)


@pytest.mark.parametrize("name", C.corruptions_for((8, 8)))
def test_grayscale_shapes_preserved(name):
    for shape in [(8, 8), (8, 8, 1), (20, 12)]:
        img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
        out = C.corrupt(img, name, 5, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.shape == shape
    gray = GRAY[3]
    np.testing.assert_array_equal(
        C.corrupt(gray, name, 2, 11), C.corrupt(gray[..., None], name, 2, 11)[..., 0]
    )


def test_same_seed_sequence_for_a_set_is_order_independent():
    a = C.corruption_seed(0, "fog", 3, 17).generate_state(4)
    b = C.corruption_seed(0, "fog", 3, 17).generate_state(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, C.corruption_seed(1, "fog", 3, 17).generate_state(4))
    assert not np.array_equal(a, C.corruption_seed(0, "snow", 3, 17).generate_state(4))
    assert not np.array_equal(a, C.corruption_seed(0, "fog", 3, 18).generate_state(4))


# ----------------------------------------------------------------------------- definitions checked by hand


def test_contrast_and_brightness_match_their_definitions():
    img = RGB[5]
    x = img / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    expected = (np.clip((x - means) * 0.15 + means, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(C.corrupt(img, "contrast", 5), expected)
    hsv = rgb_to_hsv(x)  # the published code goes through skimage's HSV: the same formulas
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    via_hsv = np.clip(hsv_to_rgb(hsv), 0, 1) * 255
    ours = C.corrupt(img, "brightness", 5).astype(float)
    diff = np.abs(ours - np.floor(via_hsv))  # truncated like the published np.uint8(...)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.95  # 1-level differences: x.99999 vs x+1 at the cut
    black = np.zeros((8, 8, 3), np.uint8)
    np.testing.assert_array_equal(C.corrupt(black, "brightness", 2), np.full((8, 8, 3), 25, np.uint8))


def test_noise_levels_match_the_table():
    flat = np.full((64, 64, 3), 128, np.uint8)
    out = C.corrupt(flat, "gaussian_noise", 5, 0).astype(float) / 255
    assert out.std() == pytest.approx(0.10, rel=0.05)
    impulse = C.corrupt(flat, "impulse_noise", 5, 0)
    flipped = np.mean((impulse == 0) | (impulse == 255))
    assert flipped == pytest.approx(0.07, abs=0.01)


def test_motion_kernel_is_a_one_sided_gaussian_streak():
    w, dy, dx = C.motion_kernel(radius=2, sigma=1.0, angle=0.0)
    expected = np.exp(-(np.arange(5) ** 2) / 2.0)
    np.testing.assert_allclose(w, expected / expected.sum())
    np.testing.assert_array_equal(dx, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(dy, [0, 0, 0, 0, 0])
    _, dy90, dx90 = C.motion_kernel(radius=2, sigma=1.0, angle=90.0)
    np.testing.assert_array_equal(dy90, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(dx90, [0, 0, 0, 0, 0])


def test_disk_kernel_sums_to_one_and_is_symmetric():
    for radius, alias in [(0.3, 0.4), (1.5, 0.1)]:
        k = C.disk_kernel(radius, alias)
        assert k.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(k, k.T)
        np.testing.assert_allclose(k, k[::-1, ::-1])
    assert C.disk_kernel(0.3, 0.4).shape == (3, 3)  # a single pixel smoothed by the 3×3 alias blur


def test_glass_blur_equals_the_published_loop_with_view_semantics():
    """The published statement `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views, run literally."""
    img = RGB[2]
    sigma, delta, iterations = C.PARAMS["glass_blur"][3]  # severity 4: two iterations
    rng = np.random.default_rng(5)
    x = (ndimage.gaussian_filter(img / 255.0, (sigma, sigma, 0), mode="nearest") * 255).astype(np.uint8)
    rows, cols = range(32 - delta, delta, -1), range(32 - delta, delta, -1)
    for _ in range(iterations):
        offsets = rng.integers(-delta, delta, size=(2, len(rows), len(cols)))
        for i, h in enumerate(rows):
            for j, w in enumerate(cols):
                dx, dy = offsets[0, i, j], offsets[1, i, j]
                x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
    expected = (
        np.clip(ndimage.gaussian_filter(x / 255.0, (sigma, sigma, 0), mode="nearest"), 0, 1) * 255
    ).astype(np.uint8)
    np.testing.assert_array_equal(C.corrupt(img, "glass_blur", 4, np.random.default_rng(5)), expected)


def test_frost_is_a_labelled_stand_in_warned_once(caplog, monkeypatch):
    assert "frost" in C.STAND_IN_CORRUPTIONS and "stand-in" in C.STAND_IN_CORRUPTIONS["frost"]
    assert "STAND-IN" in C.frost_texture.__doc__
    monkeypatch.setattr(C, "_warned_stand_ins", set())
    with caplog.at_level(logging.WARNING, logger="sbtrainer.data.corruptions"):
        C.corrupt(RGB[0], "frost", 1, 0)
        C.corrupt(RGB[1], "frost", 2, 0)
        C.corrupt(RGB[1], "fog", 2, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "frost" in warnings[0].getMessage() and "stand-in" in warnings[0].getMessage()
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "fogg"}, ValueError, "unknown corruption 'fogg'"),
        ({"severity": 0}, ValueError, r"severity must be an integer in 1\.\.5, got 0"),
        ({"severity": 6}, ValueError, r"severity must be an integer in 1\.\.5, got 6"),
        ({"severity": 2.0}, ValueError, r"severity must be an integer in 1\.\.5, got 2.0"),
        ({"image": np.zeros((32, 32, 3), np.float32)}, TypeError, "dtype uint8.*float32"),
        ({"image": [[0, 1], [2, 3]]}, TypeError, "numpy uint8 array.*list"),
        ({"image": np.zeros((32, 32, 4), np.uint8)}, ValueError, r"shape.*\(32, 32, 4\)"),
        ({"image": np.zeros((8, 8), np.uint8), "name": "snow"}, ValueError, "at least 16×16"),
        ({"image": np.zeros((4, 4), np.uint8), "name": "fog"}, ValueError, "at least 8×8"),
        ({"rng": "seed"}, TypeError, "rng must be"),
    ],
)
def test_bad_input_raises_one_clear_error(kwargs, error, match):
    args = {"image": RGB[0], "name": "fog", "severity": 3, "rng": 0} | kwargs
    with pytest.raises(error, match=match):
        C.corrupt(**args)


# ----------------------------------------------------------------------------- datasets


def _tiny_dataset(n: int = 6):
    import datasets

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    return datasets.Dataset.from_dict(
        {"img": [im for im in RGB[:n]], "label": [i % 3 for i in range(n)]}, features=features
    )


def test_make_corrupted_dataset_columns_order_and_determinism():
    ds = _tiny_dataset()
    out = C.make_corrupted_dataset(
        ds, "img", corruptions=("fog", "gaussian_noise"), severities=(1, 5), seed=3
    )
    assert out.column_names == ["image", "label", "corruption", "severity"]
    assert len(out) == 4 * 6
    assert out["corruption"][:] == ["fog"] * 12 + ["gaussian_noise"] * 12
    assert out["severity"][:] == ([1] * 6 + [5] * 6) * 2
    assert out["label"][:] == [0, 1, 2] * 8
    assert out.features["label"].names == ["a", "b", "c"]
    # Row 7 is (fog, 5, index 1): the image equals corrupt() under that set's own seed.
    expected = C.corrupt(RGB[1], "fog", 5, np.random.default_rng(C.corruption_seed(3, "fog", 5, 1)))
    np.testing.assert_array_equal(np.asarray(out[7]["image"]), expected)
    # A set does not depend on which other sets are made, nor on their order.
    ((_, _, alone),) = C.iter_corrupted_datasets(ds, "img", corruptions=("fog",), severities=(5,), seed=3)
    reordered = C.make_corrupted_dataset(
        ds, "img", corruptions=("gaussian_noise", "fog"), severities=(5, 1), seed=3
    )
    for i in range(6):
        a = np.asarray(alone[i]["image"])
        np.testing.assert_array_equal(a, np.asarray(out[6 + i]["image"]))
        np.testing.assert_array_equal(a, np.asarray(reordered[12 + i]["image"]))
    other_seed = C.make_corrupted_dataset(ds, "img", corruptions=("fog",), severities=(5,), seed=4)
    assert not np.array_equal(np.asarray(other_seed[0]["image"]), np.asarray(alone[0]["image"]))


def test_make_corrupted_dataset_grayscale_and_errors():
    import datasets

    ds = datasets.Dataset.from_dict({"pixels": [d.tolist() for d in GRAY[:4]], "label": [0, 1, 2, 3]})
    out = C.make_corrupted_dataset(ds, "pixels", corruptions=("pixelate",), severities=(3,))
    img = out[0]["image"]
    assert img.mode == "L" and img.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(img), C.corrupt(GRAY[0], "pixelate", 3))
    with pytest.raises(ValueError, match=r"\['snow'\] do not apply to images of shape \(8, 8\)"):
        list(C.iter_corrupted_datasets(ds, "pixels", corruptions=("snow",)))
    with pytest.raises(ValueError, match="image_column 'img' is not a column"):
        list(C.iter_corrupted_datasets(ds, "img"))
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        list(C.iter_corrupted_datasets(ds, "pixels", corruptions=("rain",)))
    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5, got 7"):
        list(C.iter_corrupted_datasets(ds, "pixels", severities=(7,)))
