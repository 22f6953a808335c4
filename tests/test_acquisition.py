"""Acquisition augmentation and the training-batch transform, on real radiographs."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.pixels import to_model_tensor
from models.findings import FINDING_NAMES
from tests.conftest import shared_file
from training.acquisition import (
    AcquisitionConfig,
    augment_batch,
    augment_image,
    border,
    gamma,
    jpeg_roundtrip,
    resample_roundtrip,
)
from training.dataset import BalancedBatches, TrainingTransform

OFF = AcquisitionConfig(p_gamma=0, p_blur=0, p_sharpen=0, p_noise=0, p_jpeg=0, p_resample=0, p_border=0)


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    """An NIH PNG, an RSNA normal JPEG and a Kermany JPEG through the pixel path."""
    files = [
        shared_file("nih-findings", "images", "00000075_000.png"),
        shared_file("adult-normals-rsna", "images", "Normal-2.jpg"),
        shared_file("kermany", "train", "NORMAL", "IM-0115-0001.jpeg"),
    ]
    return np.stack([to_model_tensor(f) for f in files])


def test_each_change_keeps_range_shape_and_changes_the_film(films):
    img = films[0, ..., 0]
    rng = np.random.default_rng(0)
    for out in (
        gamma(img, 1.4),
        jpeg_roundtrip(img, 60),
        resample_roundtrip(img, 0.4),
        border(img, 0.08, rng),
    ):
        assert out.shape == img.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert np.abs(out - img).mean() > 1e-4
    # a tone curve keeps black and white and darkens mid-greys for gamma > 1
    assert gamma(img, 1.4).mean() < img.mean()
    # down- and up-sampling removes fine detail: less high-frequency energy
    assert np.abs(np.diff(resample_roundtrip(img, 0.4), axis=1)).mean() < np.abs(np.diff(img, axis=1)).mean()


def test_augmentation_is_seeded_and_never_flips(films):
    cfg = AcquisitionConfig()
    a = augment_batch(films, cfg, np.random.default_rng(5))
    b = augment_batch(films, cfg, np.random.default_rng(5))
    c = augment_batch(films, cfg, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # all changes are local or tonal: the film stays closer to itself than to its mirror image
    img = films[0, ..., 0]
    for seed in range(10):
        out = augment_image(img, cfg, np.random.default_rng(seed))
        assert np.abs(out - img).mean() < np.abs(out - img[:, ::-1]).mean()


def test_all_off_is_identity(films):
    np.testing.assert_allclose(augment_batch(films, OFF, np.random.default_rng(0)), films, atol=1e-7)


def test_config_from_yaml_lists():
    cfg = AcquisitionConfig.from_dict({"gamma": [0.8, 1.2], "p_jpeg": 0.9})
    assert cfg is not None and cfg.gamma == (0.8, 1.2) and cfg.p_jpeg == 0.9
    assert AcquisitionConfig.from_dict(None) is None
    with pytest.raises(TypeError):
        AcquisitionConfig.from_dict({"flip": True})


def test_training_transform_turns_adult_normals_into_mass_positives(films):
    """Synthetic nodules only go into adult mass-negative draws; labels follow the pixels."""
    x = np.repeat(films[:2], 8, axis=0).astype(np.float16)  # NIH PNG and RSNA normal, adult
    y = np.zeros((16, len(FINDING_NAMES)), dtype=np.float32)
    mass = FINDING_NAMES.index("mass")
    y[:4, mass] = 1.0  # already positive: left alone
    eligible = np.ones(16, dtype=bool)
    eligible[4:6] = False  # e.g. paediatric: never gets a nodule
    tf = TrainingTransform(x, eligible, acquisition=None, nodules={"probability": 1.0})
    xb, yb, maps = tf(x.astype(np.float32), y.copy(), np.arange(16), np.random.default_rng(1))
    assert maps is None  # no dense-map findings asked for
    changed = np.abs(xb - x.astype(np.float32)).reshape(16, -1).max(axis=1) > 0
    assert not changed[:6].any()  # positives and ineligible images untouched
    assert (yb[4:6, mass] == 0).all()
    assert (yb[changed, mass] == 1).all() and changed[6:].sum() >= 6
    assert (yb[6:][~changed[6:], mass] == 0).all()  # no place found: label stays negative


def test_batches_are_deterministic_with_the_transform(films):
    x = np.repeat(films, 4, axis=0).astype(np.float16)
    y = np.zeros((12, len(FINDING_NAMES)), dtype=np.float32)
    tf = TrainingTransform(x, np.ones(12, bool), acquisition=AcquisitionConfig(), nodules={"probability": 0.5})
    groups = ["a"] * 6 + ["b"] * 6
    s1 = BalancedBatches(x, y, groups, batch_size=4, steps=2, seed=3, transform=tf)
    s2 = BalancedBatches(x, y, groups, batch_size=4, steps=2, seed=3, transform=tf)
    for i in range(2):
        np.testing.assert_array_equal(s1[i][0], s2[i][0])
        np.testing.assert_array_equal(s1[i][1], s2[i][1])
