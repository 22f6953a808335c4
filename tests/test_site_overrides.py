"""Audited site settings: an admin changes a threshold or silent mode with its evidence; the
next study is judged by it (a real worker), the change is in the audit trail and rolls back."""

from __future__ import annotations

from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.models import AuditEvent, InstanceResult
from db.session import session_scope
from tests.conftest import pydicom_data_file
from tests.plugins.scoring import as_new_study, open_scoring_env
from tests.plugins.worklist import PASSWORD, WorklistApp, csrf_from
from worklist.app import create_app
from worklist.users import add_user


def test_admin_changes_are_checked_audited_and_roll_back(worklist: WorklistApp) -> None:
    admin, token = worklist.logged_in("ada", "admin")
    headers = {"X-CSRF-Token": token}
    api = "/api/admin/overrides"
    assert (
        admin.post(
            api, json={"key": "threshold:pneumnia", "value": 0.3, "evidence": "report-1"}, headers=headers
        ).status_code
        == 422
    )
    assert (
        admin.post(
            api, json={"key": "threshold:mass", "value": 1.5, "evidence": "report-1"}, headers=headers
        ).status_code
        == 422
    )
    assert (
        admin.post(api, json={"key": "threshold:mass", "value": 0.3, "evidence": ""}, headers=headers).status_code
        == 422
    )
    assert (
        admin.post(api, json={"key": "silent_mode", "value": 0.3, "evidence": "report-1"}, headers=headers).status_code
        == 422
    )
    rad, rad_token = worklist.logged_in("rita")
    refused = rad.post(
        api, json={"key": "threshold:mass", "value": 0.3, "evidence": "x-1"}, headers={"X-CSRF-Token": rad_token}
    )
    assert refused.status_code == 403

    # Through the admin page's form, as an admin would.
    assert "silent mode: order by arrival" not in admin.get("/worklist").text
    page = admin.get("/admin").text
    assert 'id="overrides"' in page and "None: the configuration file and the model card decide." in page
    form = {"csrf_token": csrf_from(page), "key": "threshold:mass", "value": "0.42", "evidence": "site-report-2026-12"}
    assert admin.post("/admin/overrides", data=form).status_code == 303
    first = admin.get(api).json()
    assert first["current"] == {"threshold:mass": 0.42}
    page = admin.get("/admin").text
    assert '0.420 <span class="sub">(site)</span>' in page and "Roll back" in page
    second = admin.post(
        api, json={"key": "silent_mode", "value": True, "evidence": "new model under test"}, headers=headers
    )
    assert second.status_code == 200
    assert "silent mode: order by arrival" in admin.get("/worklist").text  # applied without a restart

    # Only the newest change of a setting rolls back; the rollback is a change of its own.
    mass_change = first["history"][0]["id"]
    assert admin.post(f"{api}/{mass_change}/rollback", headers=headers).status_code == 200
    assert admin.post(f"{api}/{mass_change}/rollback", headers=headers).status_code == 409
    assert admin.get(api).json()["current"] == {"silent_mode": True}
    with worklist.session() as s:
        details = [
            a.detail
            for a in s.scalars(select(AuditEvent).where(AuditEvent.action == "site_override").order_by(AuditEvent.id))
        ]
    assert details == [
        "threshold:mass: - -> 0.42 (evidence: site-report-2026-12)",
        "silent_mode: - -> true (evidence: new model under test)",
        f"rollback of #{mass_change}: threshold:mass: 0.42 -> - (evidence: rollback of change #{mass_change})",
    ]


def test_a_threshold_change_applies_to_the_next_study_and_rolls_back(tmp_path: Path) -> None:
    with open_scoring_env("sqlite", tmp_path / "env") as env:
        web = TestClient(create_app(env.settings))
        with session_scope(env.factory) as s:
            add_user(s, "ada", PASSWORD, "admin")
        token = web.post("/api/login", json={"username": "ada", "password": PASSWORD}).json()["csrf_token"]
        headers = {"X-CSRF-Token": token}
        source = pydicom_data_file("RG1_UNCR.dcm")

        def push_and_judge(name: str) -> tuple[float, bool, str]:
            path = as_new_study(source, tmp_path / "push" / f"{name}.dcm")
            env.push([path])
            study = env.wait_final(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
            with env.factory() as s:
                [r] = s.scalars(select(InstanceResult).where(InstanceResult.study_id == study.id)).all()
            return (
                float((r.thresholds or {})["pneumonia"]),
                bool((r.flags or {})["pneumonia"]),
                study.priority_reason or "",
            )

        card_threshold, _, _ = push_and_judge("before")
        assert card_threshold > 0.0
        change = web.post("/api/admin/overrides", json={"key": "threshold:pneumonia", "value": 0.0, "evidence": "test"},
                          headers=headers)  # fmt: skip
        assert change.status_code == 200
        threshold, flagged, reason = push_and_judge("during")
        assert (threshold, flagged) == (0.0, True) and "pneumonia" in reason  # no restart, next study
        assert web.post(f"/api/admin/overrides/{change.json()['id']}/rollback", headers=headers).status_code == 200
        assert push_and_judge("after")[0] == card_threshold
