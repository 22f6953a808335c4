"""Which thresholds are in force and which findings may steer, for a model at a site.

The model card stores the model's own operating points (per population, chosen on validation)
and the evidence behind them; the site's configuration may override a threshold.  Every place
that flags or prioritises (the worker, ``predict``, the analyse page, the admin page, the
card's own notes) asks here, so the same image is judged alike everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.card import ModelCard
from models.findings import FINDING_NAMES
from models.operating_points import ADULT, POPULATIONS
from models.registry import TriageModel
from settings import ConfigError, Settings
from triage.policy import steering_explanation, steering_findings, thresholds_for


def check_finding_names(settings: Settings) -> None:
    """Refuse a site policy that names a finding the models do not have (ConfigError naming the key).

    A misspelt override (``pneumnia: 0.5``) used to be accepted and then did nothing: a site's
    safety threshold silently not in force.  Findings are defined in ``models.findings``, above
    the settings room, so the check lives here and runs when a command starts.
    """
    for key in ("thresholds", "critical_thresholds"):
        unknown = sorted(set(getattr(settings.triage, key)) - set(FINDING_NAMES))
        if unknown:
            raise ConfigError(
                f"triage.{key}: unknown finding {', '.join(unknown)}; choose from {', '.join(FINDING_NAMES)}"
            )


def model_thresholds(model: TriageModel, settings: Settings, population: str = ADULT) -> dict[str, float]:
    """The thresholds in force for a population: the card's operating point for it, overridden per site.

    A site override in ``triage.thresholds`` wins for every population: the site chose that
    operating point on its own data.
    """
    return thresholds_for(model.thresholds(population), settings.triage)


def operating_points(model: TriageModel, settings: Settings) -> dict[str, dict[str, float]]:
    """The thresholds in force for every population, computed once per study, not once per instance."""
    return {p: model_thresholds(model, settings, p) for p in POPULATIONS}


def card_specificity(card: ModelCard, population: str = ADULT) -> dict[str, float | None]:
    """Validation specificity at each finding's operating threshold, from the model card: that
    population's images at its own point where the card has them, else all images."""
    metrics = card.validation_metrics or {}
    overall = metrics.get("overall", {})
    own = (metrics.get("by_population") or {}).get(population) or {}
    out: dict[str, float | None] = {}
    for f in card.findings:
        spec = ((own.get(f) or {}).get("operating_point") or {}).get("specificity")
        if spec is None:
            spec = ((overall.get(f) or {}).get("operating_point") or {}).get("specificity")
        out[f] = float(spec) if spec is not None else None
    return out


def card_evidence(card: ModelCard, population: str = ADULT) -> dict[str, Any] | None:
    """The card's within-collection evidence per finding for a population ({} when the card
    has evidence but none for this population: weak); None on cards made before it."""
    evidence = card.steering_evidence or None
    return None if evidence is None else dict(evidence.get(population) or {})


def card_steering(card: ModelCard, settings: Settings, population: str = ADULT) -> frozenset[str]:
    """Findings of the model with this card allowed to raise priority at this site, for images
    judged at a population's operating point."""
    return steering_findings(card_specificity(card, population), settings.triage, card_evidence(card, population))


def model_steering(model: TriageModel, settings: Settings, population: str = ADULT) -> frozenset[str]:
    """Findings of this model allowed to raise priority at this site (adult point by default)."""
    return card_steering(model.card, settings, population)


def steering_points(model: TriageModel, settings: Settings) -> dict[str, frozenset[str]]:
    """The steering findings for every population, like ``operating_points`` for thresholds."""
    return {p: model_steering(model, settings, p) for p in POPULATIONS}


def at_point(points: Mapping[str, Mapping[str, float]], population: str) -> dict[str, float]:
    """The thresholds one image is flagged and judged at: its population's, else the adult ones."""
    return dict(points.get(population, points[ADULT]))


def card_points(card: ModelCard, settings: Settings) -> dict[str, dict[str, float]]:
    """``operating_points`` from a card alone (no model loaded): what the admin page shows."""
    return {
        p: thresholds_for({**card.thresholds, **card.thresholds_by_population.get(p, {})}, settings.triage)
        for p in POPULATIONS
    }


def steering_reasons(card: ModelCard, settings: Settings) -> dict[str, dict[str, str]]:
    """Per population and finding, in words, why it steers or not (admin page, model card)."""
    return {
        pop: {
            f: steering_explanation(f, card_specificity(card, pop), settings.triage, card_evidence(card, pop))
            for f in card.findings
        }
        for pop in POPULATIONS
    }
