"""The Performance page and its API on a small fixture whose figures are worked out by hand.

Six scored pneumonia results with truth for five (one uncertain): sensitivity 2/3,
specificity 1/2, PPV 2/3, AUC 4/6.  Fourteen more, unread, make the 20 studies a drift
judgement needs here: their pneumonia scores sit far above the card's validation distribution
(drift alarm), the mass scores follow it (no alarm).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from db.models import GroundTruth, Instance, InstanceResult, Series, Study, TruthLabel, utcnow
from models.card import ModelCard
from models.metrics import population_stability_index, score_histogram
from models.registry import resolve_model_path
from tests.plugins.worklist import WorklistApp

# uid: (pneumonia score, flagged, mass score, truth for pneumonia)
FIXTURE = {
    "9.1": (0.95, True, 0.01, TruthLabel.PRESENT),
    "9.2": (0.85, True, 0.02, TruthLabel.ABSENT),
    "9.3": (0.35, False, 0.03, TruthLabel.PRESENT),
    "9.4": (0.75, True, 0.04, TruthLabel.PRESENT),
    "9.5": (0.15, False, 0.05, TruthLabel.ABSENT),
    "9.6": (0.25, False, 0.15, TruthLabel.UNCERTAIN),
}
MODEL = "default@3.0.0"
# (scores sit mid-bin: 0.3 would fall in the 0.2-0.3 bin as floating point)


def add_scored(
    wl: WorklistApp, uid: str, pneumonia: float, flagged: bool, mass: float, ae: str, days_ago: float = 1
) -> int:
    now = utcnow()
    study_id = wl.add_study(uid, priority=1 if flagged else 2, calling_ae=ae, flagged=("pneumonia",) if flagged else ())
    with wl.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        study.model_ref, study.finished_at, study.time_to_priority_s = MODEL, now - timedelta(days=days_ago), pneumonia
        series = s.scalars(select(Series).where(Series.study_id == study_id)).one()
        inst = Instance(sop_instance_uid=f"{uid}.1.1", series_id=series.id, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", spool_path="x", sha256="0" * 64, size_bytes=1,
                        calling_ae=ae)  # fmt: skip
        s.add(inst)
        s.flush()
        s.add(InstanceResult(instance_id=inst.id, study_id=study_id, model_ref=MODEL, outcome="scored",
                             scores={"pneumonia": pneumonia, "mass": mass, "covid19": 0.0},
                             flags={"pneumonia": flagged, "mass": False, "covid19": False},
                             thresholds={"pneumonia": 0.5, "mass": 0.5, "covid19": 0.5}, operating_point="adult",
                             pipeline_version="xtpx-3", started_at=now, finished_at=now))  # fmt: skip
    return study_id


@pytest.fixture
def site(make_worklist) -> WorklistApp:  # type: ignore[no-untyped-def]
    worklist = make_worklist(monitoring={"min_drift_studies": 20})
    for uid, (pn, flagged, mass, truth) in FIXTURE.items():
        study_id = add_scored(worklist, uid, pn, flagged, mass, "ED_DR")
        with worklist.session() as s:
            s.add(
                GroundTruth(
                    study_id=study_id, finding="pneumonia", label=truth, source="radiologist", recorded_by="rita"
                )
            )
    for n in range(14):  # unread studies: enough for a drift judgement, mass as in validation
        add_scored(worklist, f"9.9.{n}", 0.95, True, 0.02, "ED_DR")
    add_scored(worklist, "9.7", 0.95, True, 0.5, "ED_DR", days_ago=60)  # outside the default 30-day period
    add_scored(worklist, "9.8", 0.95, True, 0.5, "WARD_CR")  # another source
    return worklist


def test_figures_match_the_hand_worked_values(site: WorklistApp) -> None:
    admin, _ = site.logged_in("ada", "admin")
    perf = admin.get("/api/admin/performance", params={"calling_ae": "ED_DR"}).json()
    assert perf["studies"] == 20
    pn = perf["findings"]["pneumonia"]
    assert (pn["studies"], pn["flagged"], pn["flag_rate"]) == (20, 17, 0.85)
    assert pn["histogram"] == [0, 1, 1, 1, 0, 0, 0, 1, 1, 15]
    assert pn["labelled"] == {"n": 5, "n_pos": 3, "n_neg": 2}  # the uncertain one is left out
    assert pn["sensitivity"]["value"] == pytest.approx(2 / 3) and pn["sensitivity"]["n"] == 3
    assert pn["specificity"]["value"] == pytest.approx(1 / 2) and pn["specificity"]["n"] == 2
    assert pn["ppv"]["value"] == pytest.approx(2 / 3) and pn["ppv"]["n"] == 3
    assert pn["auc"]["value"] == pytest.approx(4 / 6)
    for key in ("sensitivity", "specificity", "ppv"):
        lo, hi = pn[key]["ci95"]
        assert 0 <= lo <= pn[key]["value"] <= hi <= 1
    # Drift against the card's adult validation distribution: pneumonia shifted, mass not.
    reference = ModelCard.load(resolve_model_path(settings=site.settings).parent / "card.json").score_reference["adult"]
    assert pn["psi"] == pytest.approx(population_stability_index(reference["pneumonia"], pn["histogram"]))
    assert pn["drift_alarm"] is True and pn["psi"] >= site.settings.monitoring.psi_alarm
    mass = perf["findings"]["mass"]
    assert mass["histogram"] == score_histogram([0.01, 0.02, 0.03, 0.04, 0.05, 0.15] + [0.02] * 14)  # type: ignore[arg-type]
    assert mass["drift_alarm"] is False and mass["labelled"]["n"] == 0 and "sensitivity" not in mass
    assert perf["operational"]["time_to_priority_s"]["p50"] == pytest.approx(0.95)  # the median of the times set
    assert perf["breakdown"] == [
        {
            "calling_ae": "ED_DR",
            "model": MODEL,
            "studies": 20,
            "flag_rate": {"pneumonia": 0.85, "mass": 0.0, "covid19": 0.0},
        }
    ]
    # Without the source filter the other room is counted; a longer period brings back the old study.
    assert admin.get("/api/admin/performance").json()["studies"] == 21
    since = (utcnow() - timedelta(days=90)).date().isoformat()
    assert admin.get("/api/admin/performance", params={"since": since}).json()["studies"] == 22


def test_the_page_shows_figures_plots_and_the_alarm_to_admins_only(site: WorklistApp) -> None:
    admin, _ = site.logged_in("ada", "admin")
    html = admin.get("/admin/performance", params={"calling_ae": "ED_DR"}).text
    assert "drift alarm" in html and "0.67" in html and "data:image/png;base64," in html
    assert 'alt="ROC curves against the radiologists\' labels"' in html
    assert "Performance at this site" in admin.get("/admin").text
    radiologist, _ = site.logged_in("rita")
    assert radiologist.get("/admin/performance").status_code == 403
    assert radiologist.get("/api/admin/performance").status_code == 403
    assert admin.get("/api/admin/performance", params={"since": "yesterday"}).status_code == 400


def test_site_report_writes_the_figures_and_proposes_thresholds(site: WorklistApp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(json.loads(site.settings.model_dump_json())))
    since = (utcnow() - timedelta(days=30)).date().isoformat()
    out = tmp_path / "report"
    cli = [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "site-report", "--since", since,
           "--out", str(out), "--target-sensitivity", "0.95"]  # fmt: skip
    result = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["calibration.png", "metrics.json", "report.md", "roc.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    pn = metrics["findings"]["pneumonia"]
    assert pn["sensitivity"]["value"] == pytest.approx(2 / 3) and pn["auc"]["value"] == pytest.approx(4 / 6)
    # 95 % of three positives: all of them, so the lowest positive score; one of two negatives lies below it.
    assert pn["proposed"]["threshold"] == pytest.approx(0.35)
    assert pn["proposed"]["sensitivity"]["value"] == 1.0 and pn["proposed"]["specificity"]["value"] == 0.5
    assert "proposed" not in metrics["findings"]["mass"]  # no labels: nothing to propose
    report = (out / "report.md").read_text()
    assert "not for diagnostic use" in report and "| pneumonia | 0.500 | 0.3500 |" in report
    again = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a report
