"""Known-answer tests of the within-collection figures, on real record lists with synthetic scores.

The metrics take scores, not pixels, so no image is read: the records (sources, labels, raw
labels) are the real ones from ../shared/data, and the expected counts are computed here from
the same CSV files and folders, never typed in.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from models.card import ModelCard, render_markdown
from models.card_sections import COLLECTIONS_TITLE
from models.findings import FINDING_NAMES, label_vector
from models.metrics import expected_calibration_error
from tests.conftest import shared_file
from training.collection_metrics import (
    COMPARISONS,
    calibration_by_collection,
    collection_leak,
    collection_report,
    comparison_indices,
    named_comparisons,
    normals_specificity,
    operating_points_from_card,
    render_collection_report,
    steering_evidence,
    wilson_interval,
    within_collection_auc,
)
from training.readers import Record, read_covid_metadata, read_folder_per_class, read_nih_csv

PNEU, MASS, COVID = (FINDING_NAMES.index(n) for n in ("pneumonia", "mass", "covid19"))
ADULT_TH = {"pneumonia": 0.5, "mass": 0.5, "covid19": 0.5}


def _comparison(name_start: str):
    return next(c for c in COMPARISONS if c.name.startswith(name_start))


@pytest.fixture(scope="module")
def nih_csv_rows() -> list[dict[str, str]]:
    with shared_file("nih-findings", "labels.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def nih() -> list[Record]:
    return read_nih_csv(shared_file("nih-findings", "labels.csv").parent, source="nih")


@pytest.fixture(scope="module")
def kermany() -> list[Record]:
    return read_folder_per_class(shared_file("kermany", "train"), source="kermany", population="paediatric")


@pytest.fixture(scope="module")
def actualmed() -> list[Record]:
    return read_covid_metadata(shared_file("covid", "actualmed", "metadata.csv").parent, source="covid-actualmed")


@pytest.fixture(scope="module")
def rsna() -> list[Record]:
    """The first 300 RSNA normals as records (read from labels.csv here, independent of the reader)."""
    path = shared_file("adult-normals-rsna", "labels.csv")
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in list(csv.DictReader(fh))[:300]:
            img = path.parent / row["file"]
            assert img.exists() and row["finding"] == "No Finding"
            out.append(
                Record(
                    path=img,
                    source="rsna-normals",
                    patient_id=f"rsna-normals:{img.stem}",
                    labels=label_vector(pneumonia=0, mass=0, covid19=0),
                    population="adult",
                    raw_label=row["finding"],
                )
            )
    return out


def _split(field: str) -> set[str]:
    return {s.strip() for s in field.split("|")}


def _oracle(records: list[Record], flip: bool = False) -> np.ndarray:
    """Scores equal to the labels (unlabelled -> 0.5): a perfect scorer, or a perfectly wrong one."""
    y = np.array([r.labels for r in records], dtype=float)
    s = np.where(y < 0, 0.5, y)
    return 1.0 - s if flip else s


def _collection_id_scores(records: list[Record], seed: int = 0) -> np.ndarray:
    """Column 0 names the collection (plus tiny jitter); the other columns are noise from one rng."""
    rng = np.random.default_rng(seed)
    level = {"nih": 0.1, "kermany": 0.5, "rsna-normals": 0.9, "covid-actualmed": 0.3}
    s = rng.uniform(0.05, 0.95, size=(len(records), len(FINDING_NAMES)))
    s[:, 0] = [level[r.source] for r in records]
    s[:, 0] += rng.normal(0, 0.005, len(records))
    return s


def _is_normal(r: Record) -> bool:
    known = [v for v in r.labels if v >= 0]
    return bool(known) and all(v == 0 for v in known)


def test_nih_comparisons_select_exactly_the_csv_images(nih, nih_csv_rows):
    no_finding = {r["Image Index"] for r in nih_csv_rows if r["Finding Labels"].strip() == "No Finding"}
    pneumonia = {r["Image Index"] for r in nih_csv_rows if _split(r["Finding Labels"]) & {"Pneumonia", "Consolidation"}}
    mass = {r["Image Index"] for r in nih_csv_rows if _split(r["Finding Labels"]) & {"Mass", "Nodule"}}
    for start, want_pos in (("NIH pneumonia", pneumonia), ("NIH mass", mass)):
        pos, neg = comparison_indices(_comparison(start), nih)
        assert {nih[i].path.name for i in pos} == want_pos
        assert {nih[i].path.name for i in neg} == no_finding
    # "No Finding" means exactly that string: an image with other findings is never a negative here.
    assert len(no_finding) == sum(r.raw_label == "No Finding" for r in nih)


def test_perfect_scorer_within_nih_is_1_and_reversed_is_0(nih, nih_csv_rows):
    n_nf = sum(r["Finding Labels"].strip() == "No Finding" for r in nih_csv_rows)
    n_pneu = sum(bool(_split(r["Finding Labels"]) & {"Pneumonia", "Consolidation"}) for r in nih_csv_rows)
    good = {c["name"]: c for c in named_comparisons(nih, _oracle(nih), ADULT_TH, n_boot=50)}
    bad = {c["name"]: c for c in named_comparisons(nih, _oracle(nih, flip=True), ADULT_TH, n_boot=50)}
    name = _comparison("NIH pneumonia").name
    assert (good[name]["n_pos"], good[name]["n_neg"]) == (n_pneu, n_nf)
    assert good[name]["auc"] == 1.0 and good[name]["auc_ci95"] == [1.0, 1.0]
    assert bad[name]["auc"] == 0.0
    op = good[name]["operating_points"]["default"]
    assert (op["sensitivity"], op["specificity"], op["tp"], op["tn"]) == (1.0, 1.0, n_pneu, n_nf)
    assert bad[name]["operating_points"]["default"]["sensitivity"] == 0.0
    mass = _comparison("NIH mass").name
    assert good[mass]["auc"] == 1.0 and bad[mass]["auc"] == 0.0
    # no Kermany or Actualmed images: those comparisons say so instead of inventing a number
    for c in good.values():
        if c["source"] != "nih":
            assert c["n"] == 0 and c["auc"] is None and c["reason"]


def test_kermany_comparison_counts_match_the_folders(kermany):
    root = shared_file("kermany", "train")
    n_normal = len(list((root / "NORMAL").iterdir()))
    n_pneu = len(list((root / "PNEUMONIA").iterdir()))
    s = np.random.default_rng(1).uniform(size=(len(kermany), len(FINDING_NAMES)))
    (c,) = named_comparisons(kermany, s, ADULT_TH, comparisons=[_comparison("Kermany")], n_boot=20)
    assert (c["n_pos"], c["n_neg"]) == (n_pneu, n_normal)
    assert 0.45 < c["auc"] < 0.55  # random scores: chance


def test_too_small_comparison_reports_none_with_reason(actualmed):
    covid = [r for r in actualmed if r.label("covid19") == 1][:2]
    normal = [r for r in actualmed if r.raw_label.lower() == "no finding"]
    recs = covid + normal
    (c,) = named_comparisons(recs, _oracle(recs), ADULT_TH, comparisons=[_comparison("Actualmed")], n_boot=20)
    assert (c["n_pos"], c["n_neg"]) == (2, len(normal))
    assert c["auc"] is None and c["auc_ci95"] is None and "too few" in c["reason"]
    # the whole collection is big enough: the perfect scorer then gives 1.0
    (c,) = named_comparisons(actualmed, _oracle(actualmed), ADULT_TH, comparisons=[_comparison("Actualmed")], n_boot=20)
    assert c["n_pos"] == sum(r.label("covid19") == 1 for r in actualmed) and c["auc"] == 1.0


def test_within_collection_only_where_both_classes_exist(nih, kermany, rsna):
    recs = nih + kermany[:300] + kermany[-300:] + rsna
    within = within_collection_auc(recs, _oracle(recs), n_boot=20)
    assert "rsna-normals" not in within  # normals only: no AUC to give
    assert set(within["kermany"]) == {"pneumonia"}  # covid19 all 0, mass unlabelled
    m = within["nih"]["pneumonia"]
    assert m["n_pos"] == sum(r.label("pneumonia") == 1 for r in nih)
    assert m["n_neg"] == sum(r.label("pneumonia") == 0 for r in nih)
    assert m["auc"] == 1.0 and "covid19" not in within["nih"]


def test_normals_specificity_matches_hand_computation(rsna):
    rng = np.random.default_rng(3)
    s = rng.uniform(size=(len(rsna), len(FINDING_NAMES)))
    ops = {"adult": {"pneumonia": 0.9, "mass": 0.8, "covid19": 0.95}, "paediatric": {"pneumonia": 0.6}}
    out = normals_specificity(rsna, s, ops, sources=("rsna-normals", "not-here"))
    assert out["not-here"]["n"] == 0 and out["not-here"]["reason"]
    got = out["rsna-normals"]
    assert got["n"] == len(rsna)
    for op, th in ops.items():
        assert set(got["by_operating_point"][op]) == set(th)
        for f, t in th.items():
            m = got["by_operating_point"][op][f]
            fp = int((s[:, FINDING_NAMES.index(f)] >= t).sum())
            assert (m["n"], m["fp"], m["tn"]) == (len(rsna), fp, len(rsna) - fp)
            assert m["specificity"] == pytest.approx(1 - fp / len(rsna))
            lo, hi = m["specificity_ci95"]
            assert lo < m["specificity"] < hi


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_leak_of_a_collection_id_scorer_is_1(nih, kermany, rsna):
    normals_k = [r for r in kermany if r.raw_label == "NORMAL"][:200]
    recs = nih + normals_k + rsna
    leak = collection_leak(recs, _collection_id_scores(recs))
    assert leak["headline"]["pair"] == ["nih", "rsna-normals"]
    assert leak["headline"]["auc"] == 1.0
    assert leak["headline"]["n_a"] == sum(_is_normal(r) for r in nih)  # diseased NIH images left out
    assert leak["n_by_collection"] == {"kermany": 200, "nih": leak["headline"]["n_a"], "rsna-normals": len(rsna)}
    assert all(p["auc"] == 1.0 for p in leak["pairs"]) and len(leak["pairs"]) == 3
    assert leak["multi"]["macro_ovr_auc"] > 0.95


def test_leak_of_a_collection_independent_scorer_is_chance(nih, kermany, rsna):
    normals_k = [r for r in kermany if r.raw_label == "NORMAL"][:200]
    recs = nih + normals_k + rsna
    s = np.random.default_rng(7).uniform(0.01, 0.99, size=(len(recs), len(FINDING_NAMES)))
    leak = collection_leak(recs, s)
    assert 0.35 < leak["headline"]["auc"] < 0.65
    assert all(0.35 < p["auc"] < 0.65 for p in leak["pairs"])
    assert 0.35 < leak["multi"]["macro_ovr_auc"] < 0.65


def test_leak_restricted_to_normals_ignores_disease(nih, rsna):
    """Diseased NIH images score high; on normals only that must not read as a collection leak."""
    recs = [r for r in nih if r.raw_label == "No Finding" or not _is_normal(r)] + rsna
    rng = np.random.default_rng(5)
    s = rng.uniform(0.05, 0.3, size=(len(recs), len(FINDING_NAMES)))
    sick = np.array([not _is_normal(r) for r in recs])
    s[sick] += 0.6
    assert 0.35 < collection_leak(recs, s)["headline"]["auc"] < 0.65
    assert collection_leak(recs, s, only_normals=False)["headline"]["auc"] > 0.75
    # groups replace the source: one group for everything leaves nothing to compare
    none = collection_leak(recs, s, groups=["all"] * len(recs))
    assert none["headline"] is None and none["pairs"] == [] and none["reason"]


def test_calibration_overall_and_per_collection(nih, actualmed):
    recs = nih + actualmed[:15]
    s = np.random.default_rng(2).uniform(size=(len(recs), len(FINDING_NAMES)))
    cal = calibration_by_collection(recs, s)
    y = np.array([r.labels for r in recs])
    lab = y[:, MASS] >= 0
    assert cal["mass"]["all"]["n"] == int(lab.sum())
    assert cal["mass"]["all"]["ece"] == pytest.approx(expected_calibration_error(y[lab, MASS], s[lab, MASS]))
    assert set(cal["pneumonia"]["by_source"]) == {"nih"}  # 15 Actualmed images: too few for an ECE
    assert cal["pneumonia"]["by_source"]["nih"]["n"] == sum(r.label("pneumonia") >= 0 for r in nih)


def test_report_is_json_and_renders_headline_first(nih, kermany, actualmed, rsna):
    recs = nih + kermany[:150] + kermany[-150:] + actualmed + rsna
    s = _collection_id_scores(recs)
    report = collection_report(recs, s, {"adult": ADULT_TH, "paediatric": {**ADULT_TH, "pneumonia": 0.7}}, n_boot=50)
    assert set(report) >= {"comparisons", "within_collection", "normals_specificity", "collection_leak", "calibration"}
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    md = "\n".join(render_collection_report(report))
    assert md.startswith(f"## {COLLECTIONS_TITLE}")
    assert "Pooled figures mix collections" in md
    for c in COMPARISONS:
        assert c.name in md
    assert "**Headline: nih vs rsna-normals: AUC 1.000**" in md
    spec = report["normals_specificity"]["rsna-normals"]["by_operating_point"]["paediatric"]["pneumonia"]
    assert f"{spec['specificity']:.3f}" in md
    order = [md.index(t) for t in ("| comparison |", "AUC by source", "normals-only", "leak check", "Calibration")]
    assert order == sorted(order)


def test_operating_points_from_card_fill_partial_populations():
    card = ModelCard(name="m", version="1", architecture="a", thresholds=dict(ADULT_TH))
    if "thresholds_by_population" not in {f.name for f in dataclasses.fields(ModelCard)}:
        pytest.skip("ModelCard has no thresholds_by_population yet")
    card.thresholds_by_population = {"paediatric": {"pneumonia": 0.7}}
    ops = operating_points_from_card(card)
    assert ops == {"adult": ADULT_TH, "paediatric": {**ADULT_TH, "pneumonia": 0.7}}
    card.thresholds_by_population = {"adult": {"mass": 0.2}}
    ops = operating_points_from_card(card)
    assert ops["default"] == ADULT_TH and ops["adult"] == {**ADULT_TH, "mass": 0.2}


def test_card_renders_within_collection_section_before_pooled_metrics(nih, rsna):
    recs = nih + rsna
    report = collection_report(recs, _collection_id_scores(recs), {"adult": ADULT_TH}, n_boot=20)
    kwargs = {}
    if "thresholds_by_population" in {f.name for f in dataclasses.fields(ModelCard)}:
        kwargs["thresholds_by_population"] = {"paediatric": {"pneumonia": 0.7}}
    card = ModelCard(
        name="m",
        version="1",
        architecture="a",
        thresholds=dict(ADULT_TH),
        validation_metrics={"overall": {}, "collections": report},
        **kwargs,
    )
    md = render_markdown(card)
    assert md.index(f"## {COLLECTIONS_TITLE}: validation") < md.index("## Validation metrics")
    assert "**Headline: nih vs rsna-normals: AUC 1.000**" in md
    if kwargs:
        assert "- paediatric: pneumonia 0.700" in md
    # a card without the section renders as before, with no empty heading
    assert COLLECTIONS_TITLE not in render_markdown(dataclasses.replace(card, validation_metrics={"overall": {}}))


def test_evaluation_report_puts_within_collection_first(nih, rsna):
    from training.evaluate import render_report

    recs = nih + rsna
    result = {
        "model": "m@1",
        "data": "x",
        "n_images": len(recs),
        "n_patients": len(recs),
        "created": "now",
        "thresholds": ADULT_TH,
        "target_sensitivity": 0.95,
        "findings": {},
        "collections": collection_report(recs, _collection_id_scores(recs), {"adult": ADULT_TH}, n_boot=20),
    }
    md = render_report(result, {}, ModelCard(name="m", version="1", architecture="a"))
    assert (
        md.index(COLLECTIONS_TITLE)
        < md.index("## Pooled metrics")
        < md.index("| finding | n (pos/neg) | AUC [95% CI] | threshold |")
    )
    assert "mix collections" in md[md.index("## Pooled metrics") :]


def test_read_data_holdout_is_val_plus_test(nih, tmp_path: Path):
    from training.evaluate import read_data
    from training.splits import write_split

    splits = ("train", "val", "test")
    recs = [dataclasses.replace(r, given_split=splits[i % 3]) for i, r in enumerate(nih[:30])]
    write_split(recs, tmp_path / "split.csv")
    got, info = read_data(tmp_path / "split.csv", "holdout")
    assert sorted(r.path.name for r in got) == sorted(r.path.name for r in recs if r.given_split != "train")
    assert info["split"] == "holdout"
    val, _ = read_data(tmp_path / "split.csv", "val")
    assert {r.given_split for r in val} == {"val"}


def test_steering_evidence_per_operating_point(nih, kermany):
    """The card's steering evidence: NIH comparisons for the adult point, Kermany for children;
    a comparison the data could not measure is present with auc None (weak, never guessed)."""
    recs = [*nih, *kermany[:100], *kermany[-100:]]  # both Kermany classes
    report = collection_report(recs, _oracle(recs), ADULT_TH, n_boot=50)
    ev = steering_evidence(report)
    assert set(ev) == {"adult", "paediatric"}
    assert set(ev["adult"]) == {"pneumonia", "mass", "covid19"} and set(ev["paediatric"]) == {"pneumonia"}
    assert ev["adult"]["pneumonia"]["comparison"].startswith("NIH pneumonia")
    assert ev["adult"]["mass"]["auc"] == 1.0 and ev["adult"]["mass"]["auc_ci95"] == [1.0, 1.0]
    assert ev["paediatric"]["pneumonia"]["comparison"].startswith("Kermany")
    assert ev["paediatric"]["pneumonia"]["n_pos"] > 0
    assert ev["adult"]["covid19"]["auc"] is None and ev["adult"]["covid19"]["n_pos"] == 0  # no Actualmed here
