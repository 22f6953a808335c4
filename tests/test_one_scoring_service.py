"""One scoring service: `predict`, the analyse API and the worker judge the same file the same way.

A site configuration that changes what the shipped defaults would do (eligibility: PA only,
no empty view position; thresholds: pneumonia raised above the card's, mass far above it;
steering: adult pneumonia allowed to raise priority) must reach all three paths: the same
eligibility and reason, the same scores, flags and priority, from
``xray-triage --config site.yaml predict --json``, ``POST /api/analyse`` and a real DCMTK push
through the listener to a Celery worker.  Before the scoring service existed `predict`
ignored a site's eligibility rules and thresholds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient

from db.models import StudyState
from tests.conftest import REPO, shared_file
from tests.plugins.scoring import as_new_study, open_scoring_env, study_uid_of, write_config
from tests.plugins.worklist import PASSWORD
from triage.policy import Level

SITE = {
    "eligibility": {"view_positions": ["PA"], "allow_empty_view_position": False},
    # The card's adult thresholds are about 0.007 (pneumonia) and 0.023 (mass).
    "triage": {
        "thresholds": {"pneumonia": 0.015, "mass": 0.95},
        "min_steering_specificity": 0.0,
        "min_steering_within_auc": 0.5,
    },
}


def _files(var: Path) -> dict[str, Path]:
    """A PA film the site scores, and the same kind of film as AP, which this site refuses."""
    pa = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    cr = shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm")
    return {
        "pa": as_new_study(pa, var / "in" / "pa.dcm", ViewPosition="PA", PatientAge="054Y"),
        "ap": as_new_study(cr, var / "in" / "ap.dcm", ViewPosition="AP", PatientAge="061Y"),
    }


def _predict(config: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    run = subprocess.run(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "predict", "--json", *map(str, files)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {Path(r["path"]).name: r for r in records}


def _analyse(settings: Any, files: list[Path]) -> dict[str, dict[str, Any]]:
    from db.session import make_engine, make_sessionmaker
    from worklist.app import create_app
    from worklist.users import add_user

    engine = make_engine(settings.database.url)
    with make_sessionmaker(engine)() as s:
        add_user(s, "consistency", PASSWORD, "radiologist")
        s.commit()
    engine.dispose()
    app = create_app(settings)
    out = {}
    with TestClient(app) as client:
        token = client.post("/api/login", json={"username": "consistency", "password": PASSWORD}).json()["csrf_token"]
        for path in files:
            r = client.post(
                "/api/analyse", files={"file": (path.name, path.read_bytes())}, headers={"X-CSRF-Token": token}
            )
            assert r.status_code == 200, r.text
            out[path.name] = r.json()
    app.state.engine.dispose()
    return out


def _flags(record: dict[str, Any]) -> dict[str, bool]:
    return {f: bool(on) for f, on in record["flags"].items() if f in record["scores"]}


def test_site_config_reaches_predict_analyse_and_worker_alike(tmp_path: Path) -> None:
    with open_scoring_env("sqlite", tmp_path, **SITE) as env:
        files = _files(tmp_path)
        config = write_config(env.settings, tmp_path / "site.yaml")
        predicted = _predict(config, list(files.values()))
        analysed = _analyse(env.settings, list(files.values()))
        for path in files.values():
            env.push([path])
        studies = {name: env.wait_final(study_uid_of(path)) for name, path in files.items()}
        stored = {name: env.results(study_uid_of(path)) for name, path in files.items()}

    pa, ap = files["pa"].name, files["ap"].name
    p, a = predicted, analysed

    # The site's eligibility rule, in all three paths: the AP film is refused, with the reason.
    assert p[ap]["eligible"] is False and a[ap]["eligible"] is False
    assert "view position AP" in p[ap]["reason"] and a[ap]["reason"] == p[ap]["reason"]
    assert studies["ap"].state == StudyState.INELIGIBLE and studies["ap"].state_reason
    assert p[ap]["reason"] in studies["ap"].state_reason
    assert [r.outcome for r in stored["ap"]] == [StudyState.INELIGIBLE]
    # Never scored, in any path: a score beside a refused film is read as an answer.
    assert p[ap]["scores"] is None and a[ap]["scores"] == {} and a[ap]["flags"] == {}
    assert stored["ap"][0].scores is None
    assert p[ap]["priority"] == a[ap]["priority"] == "routine" and studies["ap"].priority == Level.ROUTINE

    # The PA film: the same scores (one pixel path, one model), flagged at the site's thresholds.
    [row] = stored["pa"]
    assert p[pa]["eligible"] is True and a[pa]["eligible"] is True and row.outcome == StudyState.SCORED
    for finding, score in p[pa]["scores"].items():
        assert a[pa]["scores"][finding] == pytest.approx(score, abs=1e-4)
        assert (row.scores or {})[finding] == pytest.approx(score, abs=1e-4)
    assert a[pa]["thresholds"] == pytest.approx(row.thresholds)
    assert a[pa]["thresholds"]["pneumonia"] == 0.015 and a[pa]["thresholds"]["mass"] == 0.95
    assert _flags(p[pa]) == a[pa]["flags"] == row.flags
    # The film's pneumonia score sits between the card's threshold and the site's: flagged
    # only because the site's threshold is what counts; mass is never flagged at 0.95.
    assert p[pa]["scores"]["pneumonia"] > 0.015 and _flags(p[pa])["pneumonia"] is True
    assert _flags(p[pa])["mass"] is False

    # Priority: pneumonia steers at this site, so the film makes its study urgent everywhere.
    assert p[pa]["priority"] == a[pa]["priority"] == Level(studies["pa"].priority).name.lower() == "urgent"
    assert p[pa]["priority_reason"] == a[pa]["priority_reason"] == studies["pa"].priority_reason

    # And the header's age picked the same operating point everywhere.
    assert row.operating_point == "adult" and "operating point: adult" in " ".join(p[pa]["flags"]["notes"])
    assert pydicom.dcmread(files["pa"], stop_before_pixels=True).ViewPosition == "PA"
