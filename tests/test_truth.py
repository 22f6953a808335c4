"""Radiologists' ground truth: one click per finding on the study page or the API, and CSV import.

Stored with who and when, every change in the audit trail; a CSV with any bad row imports
nothing and names each bad line without echoing identifiers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from sqlalchemy import select

from db.models import AuditEvent, GroundTruth, utcnow
from tests.conftest import REPO
from tests.plugins.worklist import WorklistApp, csrf_from


def truth_rows(worklist: WorklistApp) -> dict[tuple[str, str], tuple[str, str, str | None]]:
    with worklist.session() as s:
        out = {}
        for t in s.scalars(select(GroundTruth)):
            uid = worklist_uid(worklist, t.study_id)
            out[(uid, t.finding)] = (str(t.label), t.source, t.recorded_by)
        return out


def worklist_uid(worklist: WorklistApp, study_id: int) -> str:
    from db.models import Study

    with worklist.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        return study.study_uid


def audit_details(worklist: WorklistApp, action: str = "truth") -> list[tuple[str | None, str | None, str | None]]:
    with worklist.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        return [(a.username, a.study_uid, a.detail) for a in rows]


def test_a_radiologist_records_truth_on_the_page_and_by_api(worklist: WorklistApp) -> None:
    worklist.add_study("7.1", priority=1, flagged=("pneumonia",))
    client, token = worklist.logged_in("rita")
    page = client.get("/studies/7.1").text
    assert 'id="truth"' in page and page.count('name="label" value="present"') == 3  # one row per finding

    t0 = utcnow()
    r = client.post(
        "/studies/7.1/truth", data={"finding": "pneumonia", "label": "present", "csrf_token": csrf_from(page)}
    )
    assert r.status_code == 303 and r.headers["location"] == "/studies/7.1#truth"
    r = client.put(
        "/api/studies/7.1/truth", json={"finding": "mass", "label": "absent"}, headers={"X-CSRF-Token": token}
    )
    assert r.status_code == 200
    truth = r.json()["truth"]
    assert {f: (t["label"], t["by"], t["source"]) for f, t in truth.items()} == {
        "pneumonia": ("present", "rita", "radiologist"),
        "mass": ("absent", "rita", "radiologist"),
    }
    assert all(t0.isoformat() <= t["at"] for t in truth.values())
    page = client.get("/studies/7.1").text
    assert 'value="present" aria-pressed="true"' in page and "present – rita" in page

    # Changed and cleared: the row follows, the audit trail keeps every step.
    client.put(
        "/api/studies/7.1/truth", json={"finding": "pneumonia", "label": "uncertain"}, headers={"X-CSRF-Token": token}
    )
    client.put("/api/studies/7.1/truth", json={"finding": "mass", "label": None}, headers={"X-CSRF-Token": token})
    assert truth_rows(worklist) == {("7.1", "pneumonia"): ("uncertain", "radiologist", "rita")}
    assert audit_details(worklist) == [
        ("rita", "7.1", "pneumonia: - -> present"),
        ("rita", "7.1", "mass: - -> absent"),
        ("rita", "7.1", "pneumonia: present -> uncertain"),
        ("rita", "7.1", "mass: absent -> -"),
    ]


def test_bad_truth_requests_are_refused_and_change_nothing(worklist: WorklistApp) -> None:
    worklist.add_study("7.2")
    client, token = worklist.logged_in("rita")
    headers = {"X-CSRF-Token": token}
    assert (
        client.put(
            "/api/studies/7.2/truth", json={"finding": "pneumnia", "label": "present"}, headers=headers
        ).status_code
        == 422
    )
    assert (
        client.put("/api/studies/7.2/truth", json={"finding": "mass", "label": "maybe"}, headers=headers).status_code
        == 422
    )
    assert (
        client.put("/api/studies/7.2/truth", json={"finding": "mass", "label": "present"}).status_code == 403
    )  # no CSRF
    assert (
        client.put("/api/studies/9.9/truth", json={"finding": "mass", "label": "present"}, headers=headers).status_code
        == 404
    )
    anonymous = worklist.client()
    # Without a session (and so without its CSRF token) it is refused before anything else.
    refused = anonymous.put("/api/studies/7.2/truth", json={"finding": "mass", "label": "present"})
    assert refused.status_code in (401, 403)
    assert truth_rows(worklist) == {} and audit_details(worklist) == []


def _import(worklist: WorklistApp, tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(json.loads(worklist.settings.model_dump_json())))
    csv = tmp_path / "truth.csv"
    csv.write_text(text)
    cli = [
        sys.executable,
        "-m",
        "xray_triage.cli",
        "--config",
        str(config),
        "truth",
        "import",
        str(csv),
        "--by",
        "audit-2026",
    ]
    return subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_csv_import_is_all_or_nothing_and_names_each_bad_line(worklist: WorklistApp, tmp_path: Path) -> None:
    worklist.add_study("7.3")
    worklist.add_study("7.4")
    with worklist.session() as s:
        from db.models import Study

        for uid, acc in (("7.3", "ACC-73"), ("7.4", "ACC-74")):
            s.scalars(select(Study).where(Study.study_uid == uid)).one().accession_number = acc
    bad = (
        "study_uid,accession,finding,present\n"
        "7.3,,pneumonia,yes\n"
        ",ACC-SECRET-99,mass,no\n"  # unknown accession
        "7.4,,pneumnia,1\n"  # misspelt finding
        "7.4,,mass,perhaps\n"  # bad value
        "7.3,,pneumonia,no\n"  # repeats line 2
    )
    result = _import(worklist, tmp_path, bad)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines[:4]] == ["line 3", "line 4", "line 5", "line 6"]
    assert "no study with this accession number" in lines[0] and "unknown finding" in lines[1]
    assert "present must be" in lines[2] and "repeats line 2" in lines[3]
    assert "nothing imported" in lines[-1] and "ACC-SECRET-99" not in result.stderr  # identifiers are not echoed
    assert truth_rows(worklist) == {}

    good = "accession,finding,present\nACC-73,pneumonia,yes\nACC-73,mass,absent\nACC-74,covid19,uncertain\n"
    result = _import(worklist, tmp_path, good)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 3 label(s) for 2 studies"
    assert truth_rows(worklist) == {
        ("7.3", "pneumonia"): ("present", "import", "audit-2026"),
        ("7.3", "mass"): ("absent", "import", "audit-2026"),
        ("7.4", "covid19"): ("uncertain", "import", "audit-2026"),
    }
    assert ("audit-2026", "7.3", "pneumonia: - -> present (import truth.csv)") in audit_details(worklist)
    assert _import(worklist, tmp_path, "finding,present\npneumonia,yes\n").stderr.startswith(
        "xray-triage: header: missing column(s) study_uid or accession"
    )
