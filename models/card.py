"""Model card: what a saved model is, what it was trained and validated on, and where it stops.

The card travels beside the ``.keras`` file (``card.json`` + a rendered ``card.md``); the worker
reads thresholds and the preprocessing version from it, so a model whose card disagrees with
the running pixel path can be refused instead of silently mis-scored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.card_sections import (
    COLLECTIONS_TITLE,
    fmt_number,
    render_collection_report,
    render_localisation,
    render_thresholds_by_population,
)
from models.findings import DISCLAIMER, FINDING_NAMES, FINDINGS

INTENDED_USE = (
    "Triage aid beside a PACS: orders a reading worklist so that chest radiographs likely to show "
    "pneumonia, a lung mass/nodule or a COVID-19 pattern are read sooner. " + DISCLAIMER
)
DEFAULT_LIMITATIONS = (
    "Not a diagnosis: every image must still be read by a qualified reader; a low score does not exclude disease.",
    "Trained from scratch (no ImageNet weights) on about 8,300 public images: Kermany children and RSNA adult "
    "normals dominate; adult pneumonia, mass and COVID-19 examples number only in the hundreds.",
    "COVID-19 positives come from three small collections (about 130 patients), many ICU/AP images with lines and "
    "tubes; the COVID-19 score may partly reflect 'ICU image' and its interval is wide.",
    "NIH labels were mined from reports and are noisy; 'mass' merges NIH Mass and Nodule.",
    "Frontal (PA/AP) chest radiographs only; lateral views, other body parts and non-human subjects are refused "
    "by the eligibility rules, not by the model.",
    "Validated on a held-out patient-level split of the same public collections; performance at another hospital "
    "or on another population (e.g. portable adult ICU films) may be lower.",
)


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: str
    findings: list[str] = field(default_factory=lambda: list(FINDING_NAMES))
    input_size: int = 224
    internal_size: int | None = None
    preprocessing_version: str = ""
    parameters: int = 0
    # The adult/default operating point: used for every population without its own entry below.
    thresholds: dict[str, float] = field(default_factory=dict)
    # Operating points per population (models.operating_points: "adult", "paediatric"), e.g.
    # {"paediatric": {"pneumonia": 0.7}}: one threshold chosen on a mixed validation set gives a
    # different sensitivity on children and adults.  A finding missing here falls back to
    # `thresholds`; cards written before this field load with it empty.
    thresholds_by_population: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per population and finding, the within-collection AUC (test split) whether it may steer a
    # worklist is decided on (triage.policy.steering_findings): {"adult": {"pneumonia": {...}}};
    # empty on cards made before it existed.
    steering_evidence: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    target_sensitivity: float = 0.95
    calibration: dict[str, Any] = field(default_factory=dict)
    training_data: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    # Validation score distributions, {population: {finding: counts per tenth of [0, 1]}}
    # (models.metrics.score_histogram): what a site's scores are compared with for drift.
    score_reference: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = INTENDED_USE
    limitations: list[str] = field(default_factory=lambda: list(DEFAULT_LIMITATIONS))
    disclaimer: str = DISCLAIMER
    created: str = ""

    @property
    def ref(self) -> str:
        """``name@version``: how results name the model that produced them."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        j = folder / "card.json"
        m = folder / "card.md"
        j.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        m.write_text(render_markdown(self), encoding="utf-8")
        return j, m

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        if path.is_dir():
            path = path / "card.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


_fmt = fmt_number


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows: AUC [95% CI], sensitivity, specificity, PPV, NPV at the threshold, n."""
    rows = [
        "| finding | n (pos/neg) | AUC [95% CI] | threshold | sensitivity | specificity | PPV | NPV | Brier | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in FINDING_NAMES:
        m = metrics.get(name)
        if not m or not m.get("n"):
            rows.append(f"| {name} | 0 | not labelled in this data | | | | | | | |")
            continue
        ci = m.get("auc_ci95")
        auc = _fmt(m.get("auc")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        op = m.get("operating_point", {})
        rows.append(
            f"| {name} | {m['n']} ({m['n_pos']}/{m['n_neg']}) | {auc} | {_fmt(op.get('threshold'))} | "
            f"{_fmt(op.get('sensitivity'))} | {_fmt(op.get('specificity'))} | {_fmt(op.get('ppv'))} | "
            f"{_fmt(op.get('npv'))} | {_fmt(m.get('brier'))} | {_fmt(m.get('ece'))} |"
        )
    return rows


def render_markdown(card: ModelCard) -> str:
    lines = [
        f"# Model card: {card.ref}",
        "",
        f"**{card.disclaimer}**",
        "",
        "## Summary",
        "",
        f"- Architecture: `{card.architecture}`, {card.parameters:,} parameters",
        f"- Input: {card.input_size}x{card.input_size}x1 float32 in [0, 1] from the pixel path "
        f"`{card.preprocessing_version}` (letterboxed); backbone resolution {card.internal_size or card.input_size}",
        f"- Findings (one sigmoid score each): {', '.join(card.findings)}",
        f"- Created: {card.created}",
    ]
    # Within-collection figures come before anything pooled: pooled AUCs mix collections and can
    # be won by recognising the collection, so they are not what a reader should see first.
    # The test split first: validation also chose the checkpoint and the thresholds.
    held = (card.test_metrics or {}).get("held_out") or {}
    if held.get("collections"):
        title = (
            f"{COLLECTIONS_TITLE}: collections never trained on ({', '.join(held['sources'])}), "
            "all films outside validation"
        )
        lines += ["", *render_collection_report(held["collections"], title=title)]
    for split_name, m in (("test", card.test_metrics), ("validation", card.validation_metrics)):
        if m and m.get("collections"):
            lines += ["", *render_collection_report(m["collections"], title=f"{COLLECTIONS_TITLE}: {split_name}")]
    lines += ["", *render_localisation((card.test_metrics or {}).get("synthetic_nodules") or {})]
    lines += [
        "## Findings and operating thresholds",
        "",
        f"Thresholds were chosen on the validation split for sensitivity >= {card.target_sensitivity:.2f}.",
        "",
        "| finding | meaning | threshold |",
        "| --- | --- | --- |",
    ]
    for f in FINDINGS:
        if f.name in card.findings:
            lines.append(f"| {f.name} | {f.description} | {_fmt(card.thresholds.get(f.name))} |")
    by_population = render_thresholds_by_population(getattr(card, "thresholds_by_population", None))
    if by_population:
        lines += ["", *by_population]
    lines += ["", "## Intended use", "", card.intended_use, "", "## Limitations", ""]
    lines += [f"- {lim}" for lim in card.limitations]
    lines += ["", "## Training data", ""]
    for d in card.training_data:
        lines.append(
            f"- {d.get('source')}: {d.get('images')} images, {d.get('patients')} patients; {d.get('labels', '')}"
        )
    if card.split:
        lines += [
            "",
            "## Split",
            "",
            f"Patient-level, stratified by source and labels, seed {card.split.get('seed')}; file "
            f"`{card.split.get('file')}` (sha256 `{str(card.split.get('sha256', ''))[:16]}...`).",
            "",
            "| split | images | patients |",
            "| --- | --- | --- |",
        ]
        for s, c in card.split.get("counts", {}).items():
            lines.append(f"| {s} | {c.get('images')} | {c.get('patients')} |")
    if card.training:
        lines += ["", "## Training", "", "```json", json.dumps(card.training, indent=2, default=str), "```"]
    if card.calibration:
        lines += [
            "",
            "## Calibration",
            "",
            f"Method: {card.calibration.get('method')}, fitted on validation; "
            "folded into the final layer so the saved model outputs calibrated probabilities.",
            "",
        ]
    for title, m in (("Validation metrics", card.validation_metrics), ("Test metrics", card.test_metrics)):
        if m:
            lines += ["", f"## {title} (pooled over all collections)", "", *metrics_table(m.get("overall", m))]
            for pop, pm in m.get("by_population", {}).items():
                lines += ["", f"### {title}: {pop} only", "", *metrics_table(pm)]
    lines += ["", f"_{card.disclaimer}_", ""]
    return "\n".join(lines)
