"""`xray-triage site-report --since DATE`: the model measured on this site's labelled studies.

Writes a folder like `evaluate`'s (``metrics.json``, ``report.md``, ``roc.png``,
``calibration.png``, drawn by the same plotting code) and proposes, per finding, the threshold
that reaches the target sensitivity on the site's own labels, with the 95 % interval of the
specificity it buys.  Proposals are evidence for an admin's decision; nothing is applied.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from db.models import utcnow
from db.session import make_engine, make_sessionmaker
from models.card import ModelCard
from models.findings import DISCLAIMER, FINDING_NAMES
from models.registry import resolve_model_path
from monitoring.performance import Filters, label_matrix, scored_studies, site_performance
from settings import Settings


def _fmt(m: dict[str, Any] | None, digits: int = 2) -> str:
    if not m or m.get("value") is None:
        return "–"
    ci = m.get("ci95")
    text = f"{m['value']:.{digits}f}"
    return f"{text} [{ci[0]:.{digits}f}–{ci[1]:.{digits}f}]" if ci else text


def render_markdown(perf: dict[str, Any], card: ModelCard | None, target: float) -> str:
    lines = [
        f"# Site report: {card.ref if card else 'model'}",
        "",
        f"**{DISCLAIMER}** Figures from this site's scored studies and its radiologists' labels "
        "(uncertain labels left out); intervals are 95 % bootstrap intervals.",
        "",
        f"Period: {perf['period']['since']} to {perf['period']['until']}; scored studies: {perf['studies']}.",
        "",
        "| finding | studies | flag rate | PSI vs card | labelled (pos/neg) | sensitivity | specificity | PPV | AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in perf["findings"].items():
        lab = f["labelled"]
        rate = "–" if f["flag_rate"] is None else f"{100 * f['flag_rate']:.0f} %"
        psi = "–" if f["psi"] is None else f"{f['psi']:.3f}" + (" (drift alarm)" if f["drift_alarm"] else "")
        lines.append(
            f"| {name} | {f['studies']} | {rate} | {psi} | {lab['n']} ({lab['n_pos']}/{lab['n_neg']}) | "
            f"{_fmt(f.get('sensitivity'))} | {_fmt(f.get('specificity'))} | {_fmt(f.get('ppv'))} | "
            f"{_fmt(f.get('auc'), 3)} |"
        )
    lines += [
        "",
        f"## Proposed thresholds (target sensitivity {target:.2f} on this site's labels)",
        "",
        "| finding | current threshold(s) | proposed | sensitivity there | specificity there |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, f in perf["findings"].items():
        p = f.get("proposed")
        current = ", ".join(f"{t:.3f}" for t in sorted(set(f.get("thresholds", [])))) or "–"
        if p is None:
            lines.append(f"| {name} | {current} | – (needs labelled positives and negatives) | | |")
        else:
            lines.append(
                f"| {name} | {current} | {p['threshold']:.4f} | {_fmt(p['sensitivity'])} | {_fmt(p['specificity'])} |"
            )
    lines += [
        "",
        "A proposal is evidence, not a setting: nothing here changes what the worker does. A site that "
        "decides to use one applies it on the admin page, with this report as its evidence (audited, "
        "can be rolled back).",
        "",
        "![ROC](roc.png)",
        "",
        "![Calibration](calibration.png)",
        "",
    ]
    return "\n".join(lines)


def write_site_report(
    settings: Settings, since: datetime, until: datetime | None, out: Path | None, target: float | None
) -> Path:
    from models import plots

    until = until or utcnow()
    try:
        card: ModelCard | None = ModelCard.load(resolve_model_path(settings=settings).parent / "card.json")
    except Exception:  # noqa: BLE001 - the report stands without the card's reference
        card = None
    target = target if target is not None else (card.target_sensitivity if card else 0.95)
    out = out or Path(f"site-report-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    out.mkdir(parents=True, exist_ok=False)
    engine = make_engine(settings.database.url, hide_parameters=True)
    try:
        with make_sessionmaker(engine)() as session:
            f = Filters(since, until)
            cfg = settings.monitoring
            perf = site_performance(
                session, f, card.score_reference if card else {}, cfg.psi_alarm, cfg.bootstrap, target,
                cfg.min_drift_studies,
            )  # fmt: skip
            studies = scored_studies(session, f)
    finally:
        engine.dispose()
    for name in FINDING_NAMES:
        perf["findings"][name]["thresholds"] = sorted({s.thresholds[name] for s in studies if name in s.thresholds})
    perf["model"] = card.ref if card else None
    perf["target_sensitivity"] = target
    y, p = label_matrix(studies)
    metrics = {
        n: {
            "auc": (perf["findings"][n].get("auc") or {}).get("value"),
            "auc_ci95": (perf["findings"][n].get("auc") or {}).get("ci95"),
        }
        for n in FINDING_NAMES
    }
    plots.plot_roc(y, p, FINDING_NAMES, metrics, out / "roc.png")
    plots.plot_calibration(y, p, FINDING_NAMES, out / "calibration.png")
    (out / "metrics.json").write_text(json.dumps(perf, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(perf, card, target))
    return out


def parse_day(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)


def day_end(text: str) -> datetime:
    return parse_day(text) + timedelta(days=1)
