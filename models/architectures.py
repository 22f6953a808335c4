"""Model builders: a compact baseline CNN and keras.applications backbones, all Keras 3 only.

Every model takes the pixel-path tensor directly (``(224, 224, 1)`` float32 in [0, 1], see
``dicom_io.pixels.to_model_tensor``): intensity scaling, channel replication and any internal
down-sizing live *inside* the model, so the worker cannot feed it differently from training.
Augmentation layers also live inside the graph (identity at inference) so they run on
whichever backend/accelerator trains the model.

Every model ends with the same named head, which Grad-CAM and calibration rely on::

    backbone -> "cam_features" -> GAP -> Dropout -> Dense "logits" -> sigmoid "scores"

Nothing is ever downloaded: keras.applications backbones are built with ``weights=None`` or a
user-supplied local weights file (ImageNet transfer learning where the hospital has the file).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
from keras import layers

from models.findings import FINDING_NAMES

CAM_LAYER = "cam_features"
LOGITS_LAYER = "logits"
SCORES_LAYER = "scores"
DEFAULT_INPUT_SIZE = 224  # mirrors dicom_io.pixels.DEFAULT_INPUT_SIZE; checked at build time when importable


@dataclass(frozen=True)
class AugmentConfig:
    """Radiograph-plausible augmentation.

    No horizontal flip by default: the heart is on the left in all but ~1/10,000 people and
    radiographs carry side markers, so a flipped film is an implausible image, and flipping
    would teach the model that laterality carries no information.  Aspect jitter is on
    because Kermany images were stretched to square while serving letterboxes native aspect.
    """

    rotation_deg: float = 7.0
    translate: float = 0.06
    zoom: float = 0.10
    aspect: float = 0.08
    contrast: float = 0.25
    brightness: float = 0.10
    horizontal_flip: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentConfig | None:
        if data is None:
            return None
        return cls(**data)


@dataclass(frozen=True)
class ArchConfig:
    """What to build: family, internal resolution, head dropout, optional local weights."""

    arch: str = "mobilenet_v3_small"
    input_size: int = DEFAULT_INPUT_SIZE
    # Resolution the backbone sees; the input stays the pixel-path size.  None = input_size.
    internal_size: int | None = None
    dropout: float = 0.2
    weights: str | None = None  # path to a local .weights.h5 for the backbone; never a download
    width: float = 1.0  # alpha for MobileNets, filter multiplier for the compact CNN
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        return cls(**data)


def _augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential:
    aug: list[layers.Layer] = [
        layers.RandomRotation(cfg.rotation_deg / 360.0, fill_mode="constant", fill_value=0.0, seed=seed),
        layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="constant", fill_value=0.0, seed=seed + 1),
        layers.RandomZoom(
            height_factor=(-cfg.zoom, cfg.zoom),
            width_factor=(-cfg.zoom - cfg.aspect, cfg.zoom + cfg.aspect),
            fill_mode="constant",
            fill_value=0.0,
            seed=seed + 2,
        ),
        layers.RandomContrast(cfg.contrast, value_range=(0.0, 1.0), seed=seed + 3),
        layers.RandomBrightness(cfg.brightness, value_range=(0.0, 1.0), seed=seed + 4),
    ]
    if cfg.horizontal_flip:
        aug.insert(0, layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(aug, name="augment")


def _conv_bn(x: Any, filters: int, stride: int = 1) -> Any:
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def _compact_features(x: Any, cfg: ArchConfig) -> Any:
    """The earlier projects' recipe (stacked 3x3 conv + pooling), with BatchNorm and a strided stem for CPU speed."""
    x = layers.Rescaling(4.0, offset=-2.0, name="normalize")(x)  # [0,1] -> about zero-mean, unit-range
    w = cfg.width
    x = _conv_bn(x, int(16 * w), stride=2)
    for filters in (32, 64, 128, 256):
        x = _conv_bn(x, int(filters * w))
        x = _conv_bn(x, int(filters * w))
        x = layers.MaxPooling2D()(x)
    return x


def _tile3(x: Any) -> Any:
    return layers.Concatenate(name="gray_to_rgb")([x, x, x])


def _app_features(x: Any, cfg: ArchConfig, size: int) -> Any:
    """keras.applications backbone, fed in the input range its (optional) ImageNet weights expect."""
    apps = keras.applications
    weights = str(Path(cfg.weights).expanduser()) if cfg.weights else None
    shape = (size, size, 3)
    a = cfg.arch
    if a in {"mobilenet_v3_small", "mobilenet_v3_large"}:
        x = _tile3(layers.Rescaling(2.0, offset=-1.0, name="normalize")(x))  # MobileNetV3: [-1, 1]
        fn = apps.MobileNetV3Small if a.endswith("small") else apps.MobileNetV3Large
        backbone = fn(
            input_shape=shape,
            alpha=cfg.width,
            include_top=False,
            weights=weights,
            include_preprocessing=False,
            minimalistic=bool(cfg.extra.get("minimalistic", False)),
        )
    elif a == "mobilenet_v2":
        x = _tile3(layers.Rescaling(2.0, offset=-1.0, name="normalize")(x))
        backbone = apps.MobileNetV2(input_shape=shape, alpha=cfg.width, include_top=False, weights=weights)
    elif a.startswith("efficientnet_b"):
        x = _tile3(layers.Rescaling(255.0, name="normalize")(x))  # EfficientNet normalizes [0,255] itself
        fn = getattr(apps, "EfficientNetB" + a[len("efficientnet_b") :])
        backbone = fn(input_shape=shape, include_top=False, weights=weights)
    elif a == "densenet121":
        # torch-style ImageNet normalization, grey approximated by the channel means
        x = _tile3(layers.Rescaling(1.0 / 0.226, offset=-0.449 / 0.226, name="normalize")(x))
        backbone = apps.DenseNet121(input_shape=shape, include_top=False, weights=weights)
    else:
        raise ValueError(f"unknown architecture {a!r}; choose from {sorted(ARCHITECTURES)}")
    backbone.name = "backbone"
    # keras.applications builds BatchNorm with momentum 0.999, tuned for ImageNet-length runs; over
    # our ~2,000 steps the moving statistics would still be mostly their initial values and the
    # model would score near-constant at inference.  0.97 averages over the last ~30 batches.
    if weights is None:
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = float(cfg.extra.get("bn_momentum", 0.97))
    return backbone(x)


ARCHITECTURES: dict[str, Callable[..., Any]] = {
    "compact_cnn": _compact_features,
    "mobilenet_v3_small": _app_features,
    "mobilenet_v3_large": _app_features,
    "mobilenet_v2": _app_features,
    "efficientnet_b0": _app_features,
    "efficientnet_b1": _app_features,
    "densenet121": _app_features,
}


def build_model(
    cfg: ArchConfig,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    n_outputs: int = len(FINDING_NAMES),
    name: str = "xray_triage",
) -> keras.Model:
    """Build an uncompiled multi-output model: one sigmoid score per finding, in FINDING_NAMES order."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose from {sorted(ARCHITECTURES)}")
    inp = keras.Input((cfg.input_size, cfg.input_size, 1), name="image")
    x = inp
    size = cfg.internal_size or cfg.input_size
    if size != cfg.input_size:
        x = layers.Resizing(size, size, interpolation="bilinear", antialias=True, name="internal_resize")(x)
    if augment is not None:
        # after the down-size: the same geometric jitter, at a fraction of the CPU cost
        x = _augmenter(augment, seed)(x)
    if cfg.arch == "compact_cnn":
        feats = _compact_features(x, cfg)
    else:
        feats = _app_features(x, cfg, size)
    feats = layers.Activation("linear", name=CAM_LAYER)(feats)
    x = layers.GlobalAveragePooling2D(name="pool")(feats)
    x = layers.Dropout(cfg.dropout, seed=seed + 7, name="head_dropout")(x)
    # A prior bias near the base rate makes the first epochs stable with masked labels.
    logits = layers.Dense(n_outputs, name=LOGITS_LAYER, bias_initializer=keras.initializers.Constant(-math.log(3)))(x)
    scores = layers.Activation("sigmoid", name=SCORES_LAYER, dtype="float32")(logits)
    return keras.Model(inp, scores, name=name)


def parameter_count(model: keras.Model) -> int:
    return int(model.count_params())
