"""A shadow model scores the same studies after the primary: stored under its own version,
compared on the Performance page, and it never changes a priority or leaves as an export."""

from __future__ import annotations

from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.models import Export, InstanceResult
from db.session import session_scope
from hl7_io.oru import parse_oru
from models.card import ModelCard
from tests.conftest import REPO, pydicom_data_file
from tests.plugins.ingest import wait_for
from tests.plugins.mllp import MllpReceiver
from tests.plugins.scoring import as_new_study, open_scoring_env, start_env_worker
from tests.plugins.worklist import PASSWORD
from worklist.app import create_app
from worklist.users import add_user

SHADOW = REPO / "models" / "baseline"


def test_shadow_scores_beside_the_primary_and_never_steers_or_exports(tmp_path: Path) -> None:
    primary_ref = ModelCard.load(REPO / "models" / "default" / "card.json").ref
    shadow_ref = ModelCard.load(SHADOW / "card.json").ref
    assert primary_ref != shadow_ref
    ris = MllpReceiver()
    try:
        destinations = [{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port}]
        with open_scoring_env(
            "sqlite", tmp_path / "env", model={"shadow_path": str(SHADOW)}, export={"destinations": destinations}
        ) as env:
            start_env_worker(env, queues=env.settings.export.queue)
            path = as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "push" / "rg1.dcm")
            env.push([path])
            study = env.wait_final(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))

            def results() -> dict[str, InstanceResult]:
                with env.factory() as s:
                    rows = s.scalars(select(InstanceResult).where(InstanceResult.study_id == study.id))
                    return {r.model_ref: r for r in rows}

            wait_for(lambda: shadow_ref in results(), timeout=240, what="the shadow model's result")
            got = results()
            primary, shadow = got[primary_ref], got[shadow_ref]
            assert (
                shadow.outcome == "scored"
                and shadow.heatmaps is None
                and set(shadow.scores or {}) == set(primary.scores or {})
            )
            # The study is the primary's: its model, its top score, its priority.
            assert study.model_ref == primary_ref
            if study.top_finding is not None:
                assert study.top_score == (primary.scores or {})[study.top_finding]
            assert study.flagged_findings == (
                "," + ",".join(f for f, on in (primary.flags or {}).items() if on) + ","
                if any((primary.flags or {}).values())
                else None
            )
            wait_for(lambda: ris.messages, timeout=60, what="the export of the primary's result")
            with env.factory() as s:
                exports = s.scalars(select(Export).where(Export.study_id == study.id)).all()
            assert [e.model_ref for e in exports] == [primary_ref]
            assert len(ris.messages) == 1 and primary_ref in ris.messages[0] and shadow_ref not in ris.messages[0]
            assert parse_oru(ris.messages[0]).priority in ("critical", "urgent", "routine")

            # The Performance page compares the two on the same study.
            web = TestClient(create_app(env.settings))
            with session_scope(env.factory) as s:
                add_user(s, "ada", PASSWORD, "admin")
            web.post("/api/login", json={"username": "ada", "password": PASSWORD}).raise_for_status()
            comparison = web.get("/api/admin/performance").json()["shadow"]
            assert (comparison["primary"], comparison["shadow"], comparison["studies"]) == (primary_ref, shadow_ref, 1)
            pn = comparison["findings"]["pneumonia"]
            same = bool((primary.flags or {})["pneumonia"]) == bool((shadow.flags or {})["pneumonia"])
            assert pn["agreement"] == (1.0 if same else 0.0)
            page = web.get("/admin/performance").text
            assert f"Shadow model {shadow_ref}" in page and f"Promote {shadow_ref} to primary" in page

            # An admin promotes the shadow, with evidence: the next study is the other model's.
            token = web.get("/api/me").json()["csrf_token"]
            headers = {"X-CSRF-Token": token}
            direct = {"key": "model:path", "value": "/tmp", "evidence": "sneaky"}
            assert web.post("/api/admin/overrides", json=direct, headers=headers).status_code == 422
            promoted = web.post("/api/admin/promote-shadow", json={"evidence": "a month side by side"}, headers=headers)
            assert promoted.json() == {"primary": shadow_ref, "shadow": primary_ref}
            second = as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "push" / "rg1-b.dcm")
            env.push([second])
            study2 = env.wait_final(str(pydicom.dcmread(second, stop_before_pixels=True).StudyInstanceUID))
            assert study2.model_ref == shadow_ref
            with env.factory() as s:
                refs = {
                    r.model_ref for r in s.scalars(select(InstanceResult).where(InstanceResult.study_id == study2.id))
                }
            assert shadow_ref in refs
            wait_for(lambda: len(ris.messages) == 2, timeout=60, what="the export of the promoted model's result")
            assert shadow_ref in ris.messages[1]
            after = web.get("/api/admin/performance").json()["shadow"]
            assert (after["primary"], after["shadow"]) == (shadow_ref, primary_ref)  # the page follows the promotion
    finally:
        ris.close()
