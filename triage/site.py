"""The site's audited overrides (made in the web app, stored in ``site_override``) over the
configuration file: the one place that turns them into the Settings the scoring service uses.

The worker applies them to every batch and the web app to every request, so a change takes
effect on the next study without a restart.  ``predict`` reads the configuration file only.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.overrides import MODEL_PATH, SHADOW_PATH, SILENT_MODE, THRESHOLD_PREFIX, current_overrides
from models.findings import FINDING_NAMES
from settings import Settings


class OverrideError(ValueError):
    """A change that cannot be made; the text says why."""


def keys() -> list[str]:
    return [SILENT_MODE, *(f"{THRESHOLD_PREFIX}{f}" for f in FINDING_NAMES)]


def check_value(key: str, value: Any) -> Any:
    """The value as stored, or OverrideError: a threshold in [0, 1] (or None: no site threshold),
    silent mode a boolean."""
    if key == SILENT_MODE:
        if not isinstance(value, bool):
            raise OverrideError("silent_mode must be true or false")
        return value
    if key in (MODEL_PATH, SHADOW_PATH):
        if value is not None and not isinstance(value, str):
            raise OverrideError("a model is given by its folder")
        return value
    if not key.startswith(THRESHOLD_PREFIX) or key[len(THRESHOLD_PREFIX) :] not in FINDING_NAMES:
        raise OverrideError(f"unknown setting {key!r}; choose from {', '.join(keys())}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise OverrideError("a threshold is a number from 0 to 1 (or null to return to the card's)")
    return float(value)


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """`settings` with the overrides on top (thresholds merged per finding, silent mode replaced)."""
    if not overrides:
        return settings
    thresholds = dict(settings.triage.thresholds)
    silent = settings.triage.silent_mode
    model = settings.model
    for key, value in overrides.items():
        if key == MODEL_PATH:
            model = model.model_copy(update={"path": str(value)})
        elif key == SHADOW_PATH:
            model = model.model_copy(update={"shadow_path": str(value)})
        elif key == SILENT_MODE:
            silent = bool(value)
        elif key.startswith(THRESHOLD_PREFIX) and key[len(THRESHOLD_PREFIX) :] in FINDING_NAMES:
            thresholds[key[len(THRESHOLD_PREFIX) :]] = float(value)
    triage = settings.triage.model_copy(update={"thresholds": thresholds, "silent_mode": silent})
    return settings.model_copy(update={"triage": triage, "model": model})


def site_settings(session: Session, settings: Settings) -> Settings:
    """The effective settings now: the configuration file with the site's audited overrides."""
    return apply_overrides(settings, current_overrides(session))
