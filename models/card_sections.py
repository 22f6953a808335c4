"""Markdown for the within-collection section of a model card or an evaluation report.

The numbers are computed by ``training.collection_metrics``; only the rendering lives here,
because the model card (``models``) sits below ``training`` and must render a stored report
without importing training code.  The input is the plain dict that ``collection_report``
returns (also what ``metrics.json`` and ``card.json`` store), so an old or partial report
renders whatever it has instead of failing.
"""

from __future__ import annotations

from typing import Any

COLLECTIONS_TITLE = "Within-collection figures (read these first)"

POOLED_NOTE = (
    "Pooled figures mix collections (paediatric and adult, PNG and JPEG, ICU and outpatient films), and a "
    "pooled AUC can be won by telling the collections apart instead of seeing disease. The comparisons below "
    "stay inside one collection, where that shortcut does not help; read them first."
)


def fmt_number(v: Any, digits: int = 3) -> str:
    """A number for a table cell; None (undefined, not zero) reads as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _auc_cell(m: dict[str, Any]) -> str:
    """AUC with its interval, or why there is none (never a made-up number)."""
    if m.get("auc") is None:
        return "n/a" + (f" ({m['reason']})" if m.get("reason") else "")
    ci = m.get("auc_ci95")
    return fmt_number(m["auc"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _rate_cell(rate: Any, ci: Any) -> str:
    if rate is None:
        return "n/a"
    return fmt_number(rate) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _counts(m: dict[str, Any]) -> str:
    return f"{m.get('n_pos', 0)}/{m.get('n_neg', 0)}"


def _comparisons_table(comparisons: list[dict[str, Any]]) -> list[str]:
    ops: list[str] = []
    for c in comparisons:
        for name in c.get("operating_points", {}):
            if name not in ops:
                ops.append(name)
    head = "| comparison | n (pos/neg) | AUC [95% CI] |" + "".join(f" sens / spec at {o} threshold |" for o in ops)
    rows = [head, "| --- | --- | --- |" + " --- |" * len(ops)]
    for c in comparisons:
        cells = [c.get("name", ""), _counts(c), _auc_cell(c)]
        for o in ops:
            op = c.get("operating_points", {}).get(o)
            if not op:
                cells.append("n/a")
                continue
            sens, spec, th = (fmt_number(op.get(k)) for k in ("sensitivity", "specificity", "threshold"))
            cells.append(f"{sens} / {spec} (t {th})")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _within_table(within: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    rows = ["| source | finding | n (pos/neg) | AUC [95% CI] |", "| --- | --- | --- | --- |"]
    for source, by_finding in within.items():
        for finding, m in by_finding.items():
            rows.append(f"| {source} | {finding} | {_counts(m)} | {_auc_cell(m)} |")
    return rows


def _specificity_table(normals: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| collection | operating point | finding | threshold | n | specificity [95% CI] | false positives |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for source, s in normals.items():
        if not s.get("n"):
            rows.append(f"| {source} | | | | 0 | n/a ({s.get('reason', 'no images')}) | |")
            continue
        for op_name, by_finding in s.get("by_operating_point", {}).items():
            for finding, m in by_finding.items():
                rows.append(
                    f"| {source} | {op_name} | {finding} | {fmt_number(m.get('threshold'))} | {m.get('n', 0)} | "
                    f"{_rate_cell(m.get('specificity'), m.get('specificity_ci95'))} | {m.get('fp', 0)} |"
                )
    return rows


def _leak_lines(leak: dict[str, Any], sub: str) -> list[str]:
    lines = [
        f"{sub} Collection leak check",
        "",
        "How well the score vectors alone tell the collections apart, on images negative for every labelled "
        "finding (so disease cannot explain the difference): cross-validated AUC of a logistic regression on the "
        "scores. 0.5 means the scores carry no trace of the collection; near 1.0 means they encode where the "
        "image came from, and pooled figures are not to be trusted.",
        "",
    ]
    head = leak.get("headline")
    if head and head.get("auc") is not None:
        a, b = head["pair"]
        lines.append(
            f"**Headline: {a} vs {b}: AUC {fmt_number(head['auc'])}** (n {head.get('n_a')} / {head.get('n_b')}); "
            f"{head.get('why', '')}"
        )
    else:
        lines.append(f"Headline: n/a ({(head or {}).get('reason') or leak.get('reason') or 'no pair'})")
    if leak.get("pairs"):
        lines += ["", "| collection A | collection B | n A | n B | leak AUC |", "| --- | --- | --- | --- | --- |"]
        for p in leak["pairs"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['n_a']} | {p['n_b']} | {fmt_number(p.get('auc'))} |")
    multi = leak.get("multi") or {}
    if multi:
        counts = ", ".join(f"{k} {v}" for k, v in multi.get("collections", {}).items())
        auc = fmt_number(multi.get("macro_ovr_auc"))
        why = f" ({multi['reason']})" if multi.get("reason") else ""
        lines += ["", f"All collections at once (macro one-vs-rest AUC): {auc}{why}; n per collection: {counts}."]
    skipped = leak.get("skipped") or {}
    if skipped:
        lines += [
            "",
            "Too few normals to test (fewer than "
            f"{leak.get('min_per_collection', 10)}): " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ".",
        ]
    return lines


def _calibration_table(calibration: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| finding | images | n (pos) | ECE |", "| --- | --- | --- | --- |"]
    for finding, c in calibration.items():
        a = c.get("all") or {}
        if a.get("n"):
            rows.append(f"| {finding} | all labelled | {a['n']} ({a.get('n_pos', 0)}) | {fmt_number(a.get('ece'))} |")
        for source, m in c.get("by_source", {}).items():
            rows.append(f"| {finding} | {source} | {m['n']} ({m.get('n_pos', 0)}) | {fmt_number(m.get('ece'))} |")
    return rows


def render_collection_report(report: dict[str, Any], level: int = 2, title: str = COLLECTIONS_TITLE) -> list[str]:
    """Markdown lines for a ``collection_report`` dict, headed ``title`` at heading ``level``.

    The named comparisons come first because they are the figures the project stands behind; the
    per-source table, the normals specificity, the leak check and the calibration follow.
    """
    h = "#" * level
    sub = "#" * (level + 1)
    lines = [f"{h} {title}", "", POOLED_NOTE, ""]
    lines += [
        "Intervals: 95% stratified bootstrap for AUCs, Wilson 95% for sensitivity/specificity rates. "
        "An AUC reads n/a when a collection has too few images of one class, rather than a number that "
        "would mean nothing.",
        "",
    ]
    if report.get("comparisons"):
        lines += _comparisons_table(report["comparisons"])
    else:
        lines.append("No named within-collection comparison could be made on these images.")
    if report.get("within_collection"):
        lines += ["", f"{sub} Within-collection AUC by source", "", *_within_table(report["within_collection"])]
    if report.get("normals_specificity"):
        lines += [
            "",
            f"{sub} Specificity on normals-only collections",
            "",
            "Every image here was judged normal, so any flag is a false positive: this is the false-alarm rate a "
            "reading list would see on normal films of that collection.",
            "",
            *_specificity_table(report["normals_specificity"]),
        ]
    if report.get("collection_leak"):
        lines += ["", *_leak_lines(report["collection_leak"], sub)]
    if report.get("calibration"):
        lines += [
            "",
            f"{sub} Calibration (expected calibration error, 10 bins)",
            "",
            "Within one collection a low ECE means the scores read as probabilities there; a pooled ECE can hide "
            "collections that are off in opposite directions.",
            "",
            *_calibration_table(report["calibration"]),
        ]
    return lines


def render_thresholds_by_population(by_population: dict[str, dict[str, float]] | None) -> list[str]:
    """One line per population: the operating thresholds used when the image's population is known."""
    if not by_population:
        return []
    lines = ["Thresholds by population (used when the population of the image is known):", ""]
    for pop, th in by_population.items():
        lines.append(f"- {pop}: " + ", ".join(f"{f} {fmt_number(v)}" for f, v in th.items()))
    return lines


def render_localisation(loc: dict[str, Any]) -> list[str]:
    """Markdown lines for the card (from ``training.localisation``): what the mass heatmap can and cannot show."""
    if not loc or not loc.get("n"):
        return []
    ci = loc.get("detection_auc_ci95")
    auc = loc.get("detection_auc_paired")
    auc_txt = "n/a" if auc is None else f"{auc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return [
        "## Heatmaps: where they point (synthetic nodules on held-out adult normals)",
        "",
        f"- {loc['n']} held-out RSNA normals, one synthetic nodule each "
        f"({loc['diameter_mm_range'][0]:.0f}-{loc['diameter_mm_range'][1]:.0f} mm).",
        f"- Mass heatmap maximum inside the nodule: {loc['share_max_inside_nodule']:.1%}; within "
        f"{loc['tolerance_px']:.0f} px of its edge: {loc['share_max_within_tolerance']:.1%}; median distance "
        f"{loc['median_distance_px']:.0f} px.",
        f"- Mass score, the same film with vs without the nodule: AUC {auc_txt}.",
        "- The map comes from a 7x7 feature grid (32 px cells at 224 px): it can show the region of a large "
        "opacity, not the outline of a small nodule, and it shows what raised the score, which need not be "
        "the lesion. These figures are for synthetic nodules; real nodules have no boxes in our data.",
        "",
    ]
