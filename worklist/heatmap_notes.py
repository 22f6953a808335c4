"""Which heatmaps a viewer offers, which it shows first, and what a person should read in each.

A Grad-CAM map shows where the score came from on a coarse 7x7 grid; it is not a lesion
outline, and for a finding whose operating point does not steer priority (informational) it
is not a finding at all.  So: one map at a time, a steering finding's first; a map of a
finding below its threshold only when asked; and a plain note per map saying how far it can
be trusted, with the model card's own localisation figures where it has any.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.card import ModelCard
from models.findings import FINDING_NAMES, get_finding
from models.registry import resolve_model_path
from settings import Settings

_NOT_VALIDATED = (
    "Not validated for localisation: the map shows which regions raised the score (a coarse 7×7 grid), "
    "not the outline of an opacity."
)


def _display(finding: str) -> str:
    return get_finding(finding).display if finding in FINDING_NAMES else finding


def heatmap_note(finding: str, steering: bool | None, localisation: Mapping[str, Any] | None) -> str:
    """What this finding's map can show, in words (``localisation``: the card's synthetic-nodule figures)."""
    notes: list[str] = []
    if steering is False:
        notes.append(
            f"{_display(finding)} is informational at this site: its operating point does not steer priority "
            "(at it the model flags many normal films). The map shows where the score came from, not a lesion."
        )
    if finding == "mass" and localisation and localisation.get("n"):
        notes.append(
            "Localisation is rough: on synthetic nodules the map's peak fell within "
            f"{float(localisation.get('tolerance_px', 16)):.0f} px (of 224) of the nodule in "
            f"{float(localisation.get('share_max_within_tolerance', 0)):.0%} of films; inside it for "
            f"{float(localisation.get('share_inside_large_ge15mm', 0)):.0%} of nodules of 15 mm or more and "
            f"{float(localisation.get('share_inside_small_lt15mm', 0)):.0%} of smaller ones. "
            "It can point at a large opacity, not find a small nodule."
        )
    else:
        notes.append(_NOT_VALIDATED)
    return " ".join(notes)


def overlays(
    heatmaps: Mapping[str, str],
    scores: Mapping[str, float],
    thresholds: Mapping[str, float],
    steering: Collection[str] | None,
    localisation: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """One entry per available map (``heatmaps``: finding -> URL), findings in model order.

    ``steering``: the findings that steer at this site for this image, None when unknown
    (a study scored before that was recorded): then no map is called informational.
    Exactly one entry (or none) has ``default`` set: the highest-scoring flagged steering
    finding's; informational and below-threshold maps are shown only when asked.
    """
    order = {f: i for i, f in enumerate(FINDING_NAMES)}
    out: list[dict[str, Any]] = []
    for finding in sorted(heatmaps, key=lambda f: (order.get(f, len(order)), f)):
        score, threshold = scores.get(finding), thresholds.get(finding)
        above = score is not None and threshold is not None and score >= threshold
        # Only a flagged finding can be called informational: below its threshold it steers nothing anyway.
        steers = None if steering is None or not above else finding in steering
        out.append(
            {
                "finding": finding,
                "display": _display(finding),
                "url": heatmaps[finding],
                "score": score,
                "threshold": threshold,
                "above_threshold": above,
                "steering": steers,
                "note": heatmap_note(finding, steers, localisation),
                "default": False,
            }
        )
    candidates = [o for o in out if o["above_threshold"] and o["steering"] is not False]
    if candidates:
        max(candidates, key=lambda o: float(o["score"] or 0.0) - float(o["threshold"] or 0.0))["default"] = True
    return out


def card_localisation(settings: Settings, model_ref: str | None) -> dict[str, Any] | None:
    """The served model card's synthetic-nodule localisation figures, when `model_ref` is that model."""
    path = resolve_model_path(settings=settings).parent / "card.json"
    try:
        ref, figures = _card_figures(str(path), path.stat().st_mtime_ns)
    except Exception:  # noqa: BLE001 - without a card the notes stay general
        return None
    return dict(figures) if figures and ref == model_ref else None


@lru_cache(maxsize=4)
def _card_figures(path: str, mtime_ns: int) -> tuple[str, dict[str, Any] | None]:
    """Read once per card file version, not on every study page (the key carries its mtime)."""
    card = ModelCard.load(Path(path))
    return card.ref, (card.test_metrics or {}).get("synthetic_nodules") or None
