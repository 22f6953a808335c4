"""Model code on real images: architectures, masked loss, calibration folding, Grad-CAM, card."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from dicom_io.pixels import to_model_tensor
from models.architectures import ArchConfig, AugmentConfig, build_model
from models.card import ModelCard, render_markdown
from models.findings import DISCLAIMER, FINDING_NAMES, FINDINGS, UNLABELLED
from models.gradcam import gradcam, gradcam_gradient
from models.losses import MaskedBinaryCrossentropy
from tests.conftest import shared_file
from training.train import fold_platt, predict_array


@pytest.fixture(scope="module")
def real_batch() -> np.ndarray:
    """Four real radiographs through the pixel path: paediatric JPEG, adult PNGs of three collections."""
    files = [
        shared_file("kermany", "train", "PNEUMONIA", "person1000_bacteria_2931.jpeg"),
        shared_file("nih-findings", "images", "00000075_000.png"),
        shared_file("covid", "hannover", "images", "006f3a8a.png"),
        shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"),
    ]
    return np.stack([to_model_tensor(f) for f in files])


def test_findings_are_one_source_of_truth():
    assert FINDING_NAMES == ("pneumonia", "mass", "covid19")
    assert len({f.name for f in FINDINGS}) == len(FINDINGS)
    assert all(0 < f.default_threshold < 1 for f in FINDINGS)


@pytest.mark.parametrize("arch", ["compact_cnn", "mobilenet_v3_small", "efficientnet_b0", "densenet121"])
def test_architectures_score_real_images(arch, real_batch):
    model = build_model(ArchConfig(arch=arch, internal_size=64), AugmentConfig(), seed=1)
    assert model.input_shape == (None, 224, 224, 1)
    p = np.asarray(model.predict_on_batch(real_batch))
    assert p.shape == (4, len(FINDING_NAMES))
    assert np.all((p > 0) & (p < 1))
    assert model.get_layer("cam_features") is not None


def test_augmentation_is_identity_at_inference(real_batch):
    model = build_model(ArchConfig(arch="compact_cnn", internal_size=64, width=0.25), AugmentConfig(), seed=2)
    a = np.asarray(model(real_batch, training=False))
    b = np.asarray(model(real_batch, training=False))
    np.testing.assert_allclose(a, b)
    flips = [layer for layer in model.get_layer("augment").layers if "flip" in layer.name]
    assert flips == []  # no horizontal flip unless a config asks for it deliberately


def test_masked_loss_ignores_unlabelled_findings():
    loss = MaskedBinaryCrossentropy()
    pred = np.array([[0.9, 0.2, 0.5]], dtype="float32")
    full = float(loss(np.array([[1, 0, UNLABELLED]], "float32"), pred))
    changed = float(loss(np.array([[1, 0, UNLABELLED]], "float32"), np.array([[0.9, 0.2, 0.01]], "float32")))
    assert full == pytest.approx(changed)  # the unlabelled output's prediction does not matter
    expected = -(np.log(0.9) + np.log(0.8)) / 2
    assert full == pytest.approx(expected, rel=1e-4)
    weighted = MaskedBinaryCrossentropy([[1, 2], [1, 1], [1, 1]])
    assert float(weighted(np.array([[1, 0, UNLABELLED]], "float32"), pred)) > full
    restored = MaskedBinaryCrossentropy.from_config(weighted.get_config())
    assert restored.class_weights == weighted.class_weights


def test_platt_folding_matches_explicit_calibration(tiny_model_dir, real_batch):
    from models.registry import load_keras_model

    model = load_keras_model(tiny_model_dir / "model.keras")
    p0 = predict_array(model, real_batch)
    params = [(1.7, -0.3), (0.6, 0.2), (1.0, 0.0)]
    fold_platt(model, params)
    p1 = predict_array(model, real_batch)
    z = np.log(p0 / (1 - p0))
    expect = 1 / (1 + np.exp(-(z * np.array([a for a, _ in params]) + np.array([b for _, b in params]))))
    np.testing.assert_allclose(p1, expect, atol=1e-4)


def test_gradcam_shape_finite_and_aligned(tiny_model, real_batch):
    maps, scores = tiny_model.heatmaps(real_batch)
    assert maps.shape == (4, len(FINDING_NAMES), 224, 224)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    np.testing.assert_allclose(scores, tiny_model.predict_tensors(real_batch), atol=1e-5)
    one, _ = gradcam(tiny_model.keras_model, real_batch[:2], "mass")
    assert one.shape == (2, 1, 224, 224)


def test_platt_goes_into_the_calibration_layer_of_a_map_model(tiny_map_model_dir, real_batch):
    from models.registry import load_keras_model

    model = load_keras_model(tiny_map_model_dir / "model.keras")
    kernel_before = model.get_layer("logits").get_weights()[0].copy()
    p0 = predict_array(model, real_batch)
    params = [(1.3, 0.4), (0.5, -0.2), (2.0, 0.1)]
    fold_platt(model, params)
    p1 = predict_array(model, real_batch)
    z = np.log(p0 / (1 - p0))
    expect = 1 / (1 + np.exp(-(z * np.array([a for a, _ in params]) + np.array([b for _, b in params]))))
    np.testing.assert_allclose(p1, expect, atol=1e-4)
    np.testing.assert_array_equal(model.get_layer("logits").get_weights()[0], kernel_before)


def test_map_finding_heatmap_is_its_own_map(tiny_map_model_dir, real_batch):
    from models.gradcam import _upsample
    from models.registry import TriageModel

    tm = TriageModel.load(tiny_map_model_dir)
    maps, scores = tm.heatmaps(real_batch)
    assert maps.shape == (4, len(FINDING_NAMES), 224, 224)
    np.testing.assert_allclose(scores, tm.predict_tensors(real_batch), atol=1e-5)
    km = tm.keras_model
    logits = keras.Model(km.inputs, km.get_layer("mass_map").output).predict_on_batch(real_batch)
    scale, offset = km.get_layer("calibration").get_weights()
    m = FINDING_NAMES.index("mass")
    prob = 1 / (1 + np.exp(-(scale[m] * np.asarray(logits) + offset[m])))
    up = _upsample(prob, (224, 224))[..., 0]
    expect = up / up.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(maps[:, m], expect, atol=1e-5)
    card = json.loads((tiny_map_model_dir / "card.json").read_text())
    assert card["test_metrics"]["synthetic_nodules"]["n"] >= 1  # the localisation check ran on the map


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="gradient Grad-CAM uses TF gradients")
def test_closed_form_gradcam_equals_gradient_gradcam(tiny_model, real_batch):
    fast, _ = gradcam(tiny_model.keras_model, real_batch)
    slow, _ = gradcam_gradient(tiny_model.keras_model, real_batch)
    np.testing.assert_allclose(fast, slow, atol=1e-3)


def test_card_round_trip_and_disclaimer(tiny_model_dir):
    card = ModelCard.load(tiny_model_dir)
    assert card.ref == "tiny@0.0.1"
    assert set(card.thresholds) == set(FINDING_NAMES)
    assert card.preprocessing_version
    assert card.split["sha256"] and card.split["counts"]["train"]["patients"] > 0
    md = (tiny_model_dir / "card.md").read_text()
    assert DISCLAIMER in md and "Limitations" in md and "Intended use" in md
    assert render_markdown(ModelCard.from_dict(json.loads((tiny_model_dir / "card.json").read_text()))) == md
