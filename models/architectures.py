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
from models.layers import FindingLogits, LogMeanExpPool, PlattCalibration, prior_logit

CAM_LAYER = "cam_features"
LOGITS_LAYER = "logits"
CALIBRATION_LAYER = "calibration"
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
    # "graph": rotation, translation and zoom run inside the model (identity at inference).
    # "cpu": the training batches get them in numpy instead (``training.geometry``), which also
    # moves the target maps of localised findings with the image; the graph keeps contrast and
    # brightness only.
    geometry: str = "graph"

    def __post_init__(self) -> None:
        if self.geometry not in {"graph", "cpu"}:
            raise ValueError(f"augment.geometry must be 'graph' or 'cpu', got {self.geometry!r}")

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
    # Findings scored from a dense logit map on a finer grid (stride ``map_stride``), pooled by
    # ``LogMeanExpPool(map_pool_r)``: focal findings (mass/nodule), trained with the inserted
    # lesion's position where one is known.  Empty: every finding from the pooled last map.
    map_findings: list[str] = field(default_factory=list)
    map_stride: int = 8
    map_channels: int = 64
    map_pool_r: float = 8.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [f for f in self.map_findings if f not in FINDING_NAMES]
        if unknown:
            raise ValueError(f"model.map_findings: unknown finding(s) {unknown}; choose from {list(FINDING_NAMES)}")
        if self.map_findings and self.map_stride not in {4, 8, 16}:
            raise ValueError(f"model.map_stride must be 4, 8 or 16, got {self.map_stride}")

    @property
    def map_size(self) -> int | None:
        """Side of the dense maps (cells), or None without maps."""
        if not self.map_findings:
            return None
        return (self.internal_size or self.input_size) // self.map_stride

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        return cls(**data)


def _augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential:
    aug: list[layers.Layer] = []
    if cfg.geometry == "graph":
        aug += [
            layers.RandomRotation(cfg.rotation_deg / 360.0, fill_mode="constant", fill_value=0.0, seed=seed),
            layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="constant", fill_value=0.0, seed=seed + 1),
            layers.RandomZoom(
                height_factor=(-cfg.zoom, cfg.zoom),
                width_factor=(-cfg.zoom - cfg.aspect, cfg.zoom + cfg.aspect),
                fill_mode="constant",
                fill_value=0.0,
                seed=seed + 2,
            ),
        ]
        if cfg.horizontal_flip:
            aug.insert(0, layers.RandomFlip("horizontal", seed=seed + 5))
    aug += [
        layers.RandomContrast(cfg.contrast, value_range=(0.0, 1.0), seed=seed + 3),
        layers.RandomBrightness(cfg.brightness, value_range=(0.0, 1.0), seed=seed + 4),
    ]
    return keras.Sequential(aug, name="augment")


def _conv_bn(x: Any, filters: int, stride: int = 1) -> Any:
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def _compact_features(x: Any, cfg: ArchConfig) -> dict[int, Any]:
    """The earlier projects' recipe (stacked 3x3 conv + pooling), with BatchNorm and a strided stem for CPU speed.

    Returns the feature map after each block by its stride (2 ... 32); the last is the CAM map.
    """
    x = layers.Rescaling(4.0, offset=-2.0, name="normalize")(x)  # [0,1] -> about zero-mean, unit-range
    w = cfg.width
    x = _conv_bn(x, int(16 * w), stride=2)
    feats = {2: x}
    for k, filters in enumerate((32, 64, 128, 256)):
        x = _conv_bn(x, int(filters * w))
        x = _conv_bn(x, int(filters * w))
        x = layers.MaxPooling2D()(x)
        feats[2 ** (k + 2)] = x
    return feats


def _tile3(x: Any) -> Any:
    return layers.Concatenate(name="gray_to_rgb")([x, x, x])


def _app_backbone(x: Any, cfg: ArchConfig, size: int) -> tuple[Any, keras.Model]:
    """keras.applications backbone, and its input scaled to the range its (optional) ImageNet weights expect."""
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
    # keras.applications builds BatchNorm with momentum 0.999, tuned for ImageNet-length runs; over
    # our ~2,000 steps the moving statistics would still be mostly their initial values and the
    # model would score near-constant at inference.  0.97 averages over the last ~30 batches.
    if weights is None:
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = float(cfg.extra.get("bn_momentum", 0.97))
    return x, backbone


def _tap_layers(backbone: keras.Model, size: int, strides: list[int]) -> list[str]:
    """Name of the deepest layer at each stride (its block's output), in ``strides`` order."""
    names = []
    for s in strides:
        side = size // s
        found = [
            layer.name
            for layer in backbone.layers
            if len(layer.output.shape) == 4 and layer.output.shape[1] == side and layer.output.shape[2] == side
        ]
        if not found:
            raise ValueError(f"{backbone.name}: no feature map of {side}x{side} (stride {s}) for the dense maps")
        names.append(found[-1])
    return names


def _backbone_features(x: Any, cfg: ArchConfig, size: int, strides: list[int]) -> dict[int, Any]:
    """{stride: features} for ``strides`` plus the last map (stride 32, the CAM layer's input)."""
    if cfg.arch == "compact_cnn":
        return _compact_features(x, cfg)
    x, backbone = _app_backbone(x, cfg, size)
    if not strides:
        backbone.name = "backbone"
        return {32: backbone(x)}
    taps = _tap_layers(backbone, size, strides)
    multi = keras.Model(
        backbone.inputs, [*(backbone.get_layer(n).output for n in taps), backbone.output], name="backbone"
    )
    outs = multi(x)
    return {**dict(zip(strides, outs[:-1], strict=True)), 32: outs[-1]}


def _map_head(feats: dict[int, Any], cfg: ArchConfig) -> list[Any]:
    """A small feature pyramid from stride 32 down to ``map_stride``, then one logit map per finding.

    Top-down: each coarser map, projected to ``map_channels`` and upsampled 2x, is added to the
    next finer one, so a cell at stride 8 sees both the local detail a nodule needs and the
    context (lung, rib, heart) that tells a nodule from a vessel end-on.
    """
    ch = cfg.map_channels
    momentum = float(cfg.extra.get("bn_momentum", 0.97))
    top = None
    for s in sorted((s for s in feats if s >= cfg.map_stride), reverse=True):
        lateral = layers.Conv2D(ch, 1, name=f"map_lateral_{s}")(feats[s])
        if top is not None:
            up = layers.UpSampling2D(2, interpolation="bilinear", name=f"map_up_{s}")(top)
            lateral = layers.Add(name=f"map_merge_{s}")([lateral, up])
        top = lateral
    h = top
    for k in range(2):
        h = layers.SeparableConv2D(ch, 3, padding="same", use_bias=False, name=f"map_conv_{k}")(h)
        h = layers.BatchNormalization(momentum=momentum, name=f"map_bn_{k}")(h)
        h = layers.ReLU(name=f"map_relu_{k}")(h)
    # Most cells of most films hold no lesion: start every cell near a low base rate.
    bias = keras.initializers.Constant(prior_logit(0.02))
    return [layers.Conv2D(1, 1, bias_initializer=bias, name=map_layer_name(f))(h) for f in cfg.map_findings]


def map_layer_name(finding: str) -> str:
    """The layer whose output is a finding's dense logit map (Grad-CAM uses it as the heatmap)."""
    return f"{finding}_map"


ARCHITECTURES: dict[str, Callable[..., Any]] = {
    "compact_cnn": _compact_features,
    "mobilenet_v3_small": _app_backbone,
    "mobilenet_v3_large": _app_backbone,
    "mobilenet_v2": _app_backbone,
    "efficientnet_b0": _app_backbone,
    "efficientnet_b1": _app_backbone,
    "densenet121": _app_backbone,
}


def build_model(
    cfg: ArchConfig,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    n_outputs: int = len(FINDING_NAMES),
    name: str = "xray_triage",
) -> keras.Model:
    """Build an uncompiled multi-output model: one sigmoid score per finding, in FINDING_NAMES order.

    With ``cfg.map_findings`` the model has a second output, the findings' dense logit maps
    (n, map_size, map_size, k) for the localisation loss; ``inference_model`` gives the
    scores-only model that is saved and served.
    """
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
    strides = [s for s in (4, 8, 16) if s >= cfg.map_stride] if cfg.map_findings else []
    feats = _backbone_features(x, cfg, size, strides)
    cam = layers.Activation("linear", name=CAM_LAYER)(feats[32])
    x = layers.GlobalAveragePooling2D(name="pool")(cam)
    x = layers.Dropout(cfg.dropout, seed=seed + 7, name="head_dropout")(x)
    # A prior bias near the base rate makes the first epochs stable with masked labels.
    logits = layers.Dense(n_outputs, name=LOGITS_LAYER, bias_initializer=keras.initializers.Constant(-math.log(3)))(x)
    if not cfg.map_findings:
        scores = layers.Activation("sigmoid", name=SCORES_LAYER, dtype="float32")(logits)
        return keras.Model(inp, scores, name=name)
    maps = _map_head(feats, cfg)
    stacked = maps[0] if len(maps) == 1 else layers.Concatenate(name="finding_maps")(maps)
    pooled = LogMeanExpPool(cfg.map_pool_r, name="map_pool")(stacked)
    columns = [FINDING_NAMES.index(f) for f in cfg.map_findings]
    logits = FindingLogits(columns, name="finding_logits")([logits, pooled])
    logits = PlattCalibration(name=CALIBRATION_LAYER)(logits)
    scores = layers.Activation("sigmoid", name=SCORES_LAYER, dtype="float32")(logits)
    return keras.Model(inp, [scores, stacked], name=name)


def inference_model(model: keras.Model) -> keras.Model:
    """The scores-only view of a model (shares its weights): what is saved for the worker."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.get_layer(SCORES_LAYER).output, name=model.name)


def parameter_count(model: keras.Model) -> int:
    return int(model.count_params())
