"""`/metrics`: Prometheus text, no login, no patient data, figures worked out by hand."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from db.models import Export, ExportState, Study, utcnow
from tests.plugins.worklist import WorklistApp


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_are_public_parseable_and_match_the_database(worklist: WorklistApp) -> None:
    # Three scored studies from two rooms, one failed, one still queued; times set by hand.
    worklist.add_study("8.1", priority=1, flagged=("pneumonia",), calling_ae="ED_DR", patient_name="SECRET^PATIENT")
    worklist.add_study("8.2", priority=2, flagged=("pneumonia", "mass"), calling_ae="ED_DR")
    worklist.add_study("8.3", priority=2, calling_ae="WARD_CR")
    worklist.add_study("8.4", state="failed", calling_ae="WARD_CR")
    worklist.add_study("8.5", priority=None, calling_ae="WARD_CR")
    with worklist.session() as s:
        for uid, seconds in (("8.1", 0.4), ("8.2", 3.0), ("8.3", 0.9), ("8.4", 45.0)):
            study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
            study.time_to_priority_s = seconds
            study.model_ref = "default@3.0.0"
        study_id = s.scalars(select(Study.id).where(Study.study_uid == "8.1")).one()
        now = utcnow()
        for name, state in (("pacs", ExportState.SENT), ("ris", ExportState.FAILED)):
            s.add(Export(study_id=study_id, destination=name, kind="dicom", generation=1, model_ref="default@3.0.0",
                         state=state, attempts=1, created_at=now, updated_at=now))  # fmt: skip

    r = worklist.client().get("/metrics")  # no login
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "SECRET" not in r.text and "8.1" not in r.text  # no patient or study identifiers
    got = samples(r.text)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    h = "xray_triage_time_to_priority_seconds"
    assert value(f"{h}_bucket", calling_ae="ED_DR", le="0.5") == 1  # 0.4
    assert value(f"{h}_bucket", calling_ae="ED_DR", le="5.0") == 2  # 0.4, 3.0
    assert value(f"{h}_bucket", calling_ae="ED_DR", le="+Inf") == 2
    assert value(f"{h}_count", calling_ae="ED_DR") == 2 and value(f"{h}_sum", calling_ae="ED_DR") == 3.4
    assert value(f"{h}_bucket", calling_ae="WARD_CR", le="1.0") == 1  # 0.9; 45 s only from 60 on
    assert value(f"{h}_bucket", calling_ae="WARD_CR", le="30.0") == 1
    assert value(f"{h}_bucket", calling_ae="WARD_CR", le="60.0") == 2
    assert value("xray_triage_studies_total", state="scored") == 3
    assert value("xray_triage_studies_total", state="failed") == 1
    assert value("xray_triage_studies_in_state", state="queued") == 1
    assert value("xray_triage_findings_flagged_total", finding="pneumonia", model="default@3.0.0") == 2
    assert value("xray_triage_findings_flagged_total", finding="mass", model="default@3.0.0") == 1
    assert value("xray_triage_exports", state="export_failed") == 1
    assert value("xray_triage_export_failures_total", destination="ris") == 1
    assert "# TYPE xray_triage_queue_depth gauge" in r.text  # samples only for queues the broker knows
