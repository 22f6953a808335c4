"""Dense finding maps: pooling and calibration layers, the map loss, positioning jitter that moves
the target with the image, and the targets a training batch of real films carries."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.pixels import to_model_tensor
from models.architectures import ArchConfig, AugmentConfig, build_model, inference_model, map_layer_name
from models.findings import FINDING_NAMES, UNLABELLED
from models.layers import FindingLogits, LogMeanExpPool, PlattCalibration
from models.losses import MaskedMapLoss
from tests.conftest import shared_file
from training.dataset import TrainingTransform
from training.geometry import cell_targets, jitter_batch, random_matrix, warp
from training.synthetic_nodules import NoduleSpec, inside_nodule, lung_mask, nodule_mask

MASS = FINDING_NAMES.index("mass")
RSNA = ("Normal-10000.jpg", "Normal-1436.jpg", "Normal-2066.jpg", "Normal-4262.jpg")


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    """Four real adult normals through the pixel path, (4, 224, 224, 1)."""
    return np.stack([to_model_tensor(shared_file("adult-normals-rsna", "images", n)) for n in RSNA])


# --- layers -----------------------------------------------------------------------------------


def test_log_mean_exp_pool_is_a_smooth_maximum():
    pool = LogMeanExpPool(r=8.0)
    flat = np.full((1, 28, 28, 1), -2.0, "float32")
    assert float(pool(flat)[0, 0]) == pytest.approx(-2.0, abs=1e-5)  # a uniform map keeps its value
    one = flat.copy()
    one[0, 10, 10, 0] = 6.0
    pooled = float(pool(one)[0, 0])
    assert 6.0 - np.log(784) / 8 - 0.01 < pooled < 6.0  # one confident cell nearly decides the film
    assert float(LogMeanExpPool(r=200.0)(one)[0, 0]) == pytest.approx(6.0, abs=0.05)
    assert LogMeanExpPool.from_config(pool.get_config()).r == 8.0


def test_finding_logits_put_each_map_into_its_column():
    dense = np.array([[1.0, 2.0, 3.0]], "float32")
    pooled = np.array([[-7.0]], "float32")
    out = np.asarray(FindingLogits([MASS])([dense, pooled]))
    expect = dense.copy()
    expect[0, MASS] = -7.0
    np.testing.assert_allclose(out, expect)


def test_platt_calibration_starts_as_identity_and_is_not_trained():
    layer = PlattCalibration()
    z = np.array([[0.5, -1.0, 2.0]], "float32")
    np.testing.assert_allclose(np.asarray(layer(z)), z)
    assert layer.trainable_weights == []


def test_map_model_outputs_scores_and_maps_and_serves_scores_only(tmp_path, normals):
    from models.registry import load_keras_model

    cfg = ArchConfig(arch="mobilenet_v3_small", width=0.5, map_findings=["mass"])
    model = build_model(cfg, AugmentConfig(geometry="cpu"), seed=3)
    assert [tuple(o.shape) for o in model.outputs] == [(None, 3), (None, 28, 28, 1)]
    assert cfg.map_size == 28
    served = inference_model(model)
    served.save(tmp_path / "m.keras")
    again = load_keras_model(tmp_path / "m.keras")  # the registry knows our layers
    p = np.asarray(again.predict_on_batch(normals))
    assert p.shape == (4, 3) and np.all((p > 0) & (p < 1))
    assert again.get_layer(map_layer_name("mass")) is not None
    geometry = [layer.name for layer in model.get_layer("augment").layers]
    assert not any(k in n for n in geometry for k in ("rotation", "translation", "zoom"))  # moved to the CPU


def test_map_findings_are_checked():
    with pytest.raises(ValueError, match="unknown finding"):
        ArchConfig(map_findings=["nodules"])
    with pytest.raises(ValueError, match="geometry"):
        AugmentConfig(geometry="gpu")


# --- loss -------------------------------------------------------------------------------------


def _bce(z: float, t: float) -> float:
    return float(max(z, 0) - z * t + np.log1p(np.exp(-abs(z))))


def test_map_loss_balances_the_one_positive_cell_against_the_rest():
    loss = MaskedMapLoss()
    z = np.full((1, 4, 4, 1), -3.0, "float32")
    z[0, 1, 2, 0] = 2.0
    y = np.zeros((1, 4, 4, 2), "float32")
    y[..., 1] = 1.0
    y[0, 1, 2, 0] = 1.0
    expect = _bce(2.0, 1.0) + _bce(-3.0, 0.0)  # mean over the one positive + mean over the 15 negatives
    assert float(loss(y, z)) == pytest.approx(expect, rel=1e-5)


def test_map_loss_ignores_films_without_a_known_position():
    loss = MaskedMapLoss()
    z = np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype("float32")
    y = np.zeros((2, 4, 4, 2), "float32")  # weight 0: a real positive or an unlabelled film
    assert float(loss(y, z)) == 0.0


# --- geometry ---------------------------------------------------------------------------------


def test_zero_jitter_is_the_identity(normals):
    cfg = AugmentConfig(rotation_deg=0, translate=0, zoom=0, aspect=0, geometry="cpu")
    a, t = random_matrix((224, 224), cfg, np.random.default_rng(0))
    np.testing.assert_allclose(a, np.eye(2))
    np.testing.assert_allclose(t, 0, atol=1e-9)
    np.testing.assert_allclose(warp(normals[0, ..., 0], a, t), normals[0, ..., 0], atol=1e-6)


def test_jitter_moves_the_lesion_mask_with_the_film(normals):
    spec = NoduleSpec(row=90.0, col=60.0, a=6.0, b=5.0, c=5.5, angle=0.3, diameter_mm=21.0, contrast=0.6, sigma=1.0)
    from training.synthetic_nodules import insert_nodule

    x = normals.copy()
    bright = np.stack([insert_nodule(f[..., 0], spec, np.random.default_rng(1)) for f in x])[..., None]
    masks = {i: nodule_mask(spec, (224, 224)) for i in range(len(x))}
    cfg = AugmentConfig(rotation_deg=7, translate=0.06, zoom=0.1, aspect=0.08, geometry="cpu")
    moved_img, moved_masks = jitter_batch(bright, cfg, np.random.default_rng(5), masks)
    moved_plain, _ = jitter_batch(x, cfg, np.random.default_rng(5), {})
    for i in range(len(x)):
        added = moved_img[i, ..., 0] - moved_plain[i, ..., 0]  # the nodule alone, after the same jitter
        peak = np.unravel_index(int(np.argmax(added)), added.shape)
        assert moved_masks[i][peak] or np.min(np.hypot(*(np.argwhere(moved_masks[i]) - peak).T)) <= 1.5
        centre = np.argwhere(moved_masks[i]).mean(axis=0)
        assert not np.allclose(centre, (90.0, 60.0), atol=0.5) or i == 0  # it did move (almost surely)


def test_cell_targets_keep_a_sub_cell_nodule():
    spec = NoduleSpec(row=100.4, col=37.6, a=1.2, b=1.0, c=1.0, angle=0.0, diameter_mm=4.2, contrast=0.2, sigma=0.5)
    mask = nodule_mask(spec, (224, 224))
    assert mask[100, 38] and mask.sum() >= 1
    assert np.all(inside_nodule(spec, *np.nonzero(mask)) | (np.argwhere(mask) == (100, 38)).all(axis=1))
    cells = cell_targets(mask, 28)
    assert cells.sum() >= 1 and cells[100 // 8, 38 // 8] == 1.0


# --- batch targets on real films --------------------------------------------------------------


def test_training_batch_targets_follow_labels_and_inserted_nodules(normals):
    x_pool = normals.astype(np.float16)
    y = np.zeros((4, 3), "float32")
    y[1, MASS] = 1.0  # a real mass positive: no position known
    y[2, MASS] = UNLABELLED
    tf = TrainingTransform(
        x_pool,
        nodule_eligible=np.ones(4, bool),
        acquisition=None,
        nodules={"probability": 1.0, "contrast": (0.3, 0.8)},
        geometry=AugmentConfig(geometry="cpu"),
        map_findings=["mass"],
        map_cells=28,
    )
    idx = np.arange(4)
    x1, y1, maps1 = tf(x_pool.astype("float32"), y.copy(), idx, np.random.default_rng([7, 0, 0, 1]))
    x2, _, maps2 = tf(x_pool.astype("float32"), y.copy(), idx, np.random.default_rng([7, 0, 0, 1]))
    np.testing.assert_array_equal(x1, x2)  # same seed, same batch
    np.testing.assert_array_equal(maps1, maps2)
    assert maps1.shape == (4, 28, 28, 2)
    # films 0 and 3 were negatives: each got a nodule, a mass label and a few positive cells
    for i in (0, 3):
        assert y1[i, MASS] == 1.0
        assert 1 <= maps1[i, ..., 0].sum() <= 40 and maps1[i, ..., 1].min() == 1.0
        lungs = lung_mask(x_pool[i, ..., 0].astype("float32"))
        r, c = np.argwhere(maps1[i, ..., 0]).mean(axis=0) * 8 + 4
        assert lungs[max(0, int(r) - 16) : int(r) + 16, max(0, int(c) - 16) : int(c) + 16].any()
    assert maps1[1, ..., 1].max() == 0.0 and y1[1, MASS] == 1.0  # real positive: image-level only
    assert maps1[2, ..., 1].max() == 0.0 and y1[2, MASS] == UNLABELLED


def test_training_batch_negatives_are_negative_everywhere(normals):
    x_pool = normals.astype(np.float16)
    y = np.zeros((4, 3), "float32")
    tf = TrainingTransform(x_pool, np.ones(4, bool), map_findings=["mass"], map_cells=28)
    _, y1, maps = tf(x_pool.astype("float32"), y, np.arange(4), np.random.default_rng(0))
    assert (y1[:, MASS] == 0).all()
    assert maps[..., 0].max() == 0.0 and maps[..., 1].min() == 1.0
