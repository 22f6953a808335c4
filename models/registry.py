"""Load a saved model once and score images with it: the API the worker and ``predict`` call.

A model folder holds ``model.keras`` and ``card.json``.  The default is ``models/default``;
another is chosen with the ``XRAY_TRIAGE_MODEL`` environment variable (a folder or a
``.keras`` file) or, where the configuration has a ``model.path`` key, by configuration.

    model = TriageModel.load()                    # once per process
    scores = model.score_tensors(batch)           # (n, 224, 224, 1) -> list of {finding: p}
    model.thresholds("paediatric")                # the card's operating point for a population
    maps, _ = model.heatmaps(batch, "pneumonia")  # (n, 1, 224, 224) in [0, 1]

Files, eligibility, site thresholds and flags are the scoring service's (``triage.service``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.card import ModelCard
from models.findings import FINDING_NAMES, get_finding
from models.operating_points import ADULT
from settings import Settings

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = MODELS_DIR / "default"
MODEL_ENV = "XRAY_TRIAGE_MODEL"
MODEL_FILE = "model.keras"


def resolve_model_path(path: str | os.PathLike[str] | None = None, settings: Settings | None = None) -> Path:
    """Explicit path, else configuration ``model.path``, else $XRAY_TRIAGE_MODEL, else models/default."""
    if path is None and settings is not None:
        section = getattr(settings, "model", None)
        path = getattr(section, "path", None) if section is not None else None
    if path is None:
        path = os.environ.get(MODEL_ENV) or DEFAULT_MODEL_DIR
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p} (run `make train`, or set {MODEL_ENV})")
    return p


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` file without its training configuration (inference needs no loss)."""
    import keras

    # Importing them registers our layers and losses, which a saved file names.
    from models import layers, losses  # noqa: F401

    return keras.saving.load_model(str(path), compile=False)


class TriageModel:
    """A loaded model and its card; thread-compatible for inference (Keras predict)."""

    def __init__(self, keras_model: Any, card: ModelCard, path: Path | None = None) -> None:
        self.keras_model = keras_model
        self.card = card
        self.path = path
        missing = [f for f in FINDING_NAMES if f not in card.findings]
        if missing:
            log.warning("model %s does not score %s", card.ref, ", ".join(missing))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, settings: Settings | None = None) -> TriageModel:
        p = resolve_model_path(path, settings)
        card_path = p.parent / "card.json"
        model = load_keras_model(p)
        if card_path.exists():
            card = ModelCard.load(card_path)
        else:
            card = ModelCard(name=p.stem, version="unversioned", architecture=model.name)
        card.input_size = int(model.inputs[0].shape[1])
        _check_pipeline(card)
        return cls(model, card, p)

    @property
    def ref(self) -> str:
        return self.card.ref

    @property
    def input_size(self) -> int:
        return int(self.card.input_size)

    def threshold(self, finding: str, population: str = ADULT) -> float:
        """The card's operating threshold for a finding at a population's operating point.

        The population's own threshold when the card has one (``thresholds_by_population``),
        else the card's default (adult) one, else the finding's built-in default, so an old
        card or a population the card does not know is judged exactly as before.
        """
        specific = (self.card.thresholds_by_population or {}).get(population) or {}
        if finding in specific:
            return float(specific[finding])
        return float(self.card.thresholds.get(finding, get_finding(finding).default_threshold))

    def thresholds(self, population: str = ADULT) -> dict[str, float]:
        """Every finding's threshold at a population's operating point (see ``threshold``)."""
        return {f: self.threshold(f, population) for f in self.card.findings}

    def predict_tensors(self, batch: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(n, H, W, 1) pixel-path tensors -> (n, n_findings) probabilities."""
        batch = np.asarray(batch, dtype="float32")
        if batch.ndim == 3:
            batch = batch[None]
        out = []
        for s in range(0, len(batch), batch_size):
            out.append(np.asarray(self.keras_model.predict_on_batch(batch[s : s + batch_size]), dtype="float32"))
        return np.concatenate(out) if out else np.zeros((0, len(self.card.findings)), dtype="float32")

    def score_tensors(self, batch: np.ndarray, batch_size: int = 16) -> list[dict[str, float]]:
        probs = self.predict_tensors(batch, batch_size)
        return [{f: float(p[i]) for i, f in enumerate(self.card.findings)} for p in probs]

    def heatmaps(self, batch: np.ndarray, findings: str | Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        from models.gradcam import gradcam

        return gradcam(self.keras_model, batch, findings)


def _check_pipeline(card: ModelCard) -> None:
    try:
        from dicom_io.pixels import COMPATIBLE_VERSIONS, PIPELINE_VERSION
    except ImportError:  # pragma: no cover
        return
    if card.preprocessing_version and card.preprocessing_version not in COMPATIBLE_VERSIONS:
        log.warning(
            "model %s was trained on pixel pipeline %s but this build runs %s: scores may shift",
            card.ref,
            card.preprocessing_version,
            PIPELINE_VERSION,
        )


_LOADED: dict[str, TriageModel] = {}


def get_model(path: str | os.PathLike[str] | None = None, settings: Settings | None = None) -> TriageModel:
    """Process-wide cache: the worker loads a model once, not once per study."""
    key = str(resolve_model_path(path, settings))
    if key not in _LOADED:
        _LOADED[key] = TriageModel.load(key)
    return _LOADED[key]
