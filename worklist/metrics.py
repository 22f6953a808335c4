"""Prometheus metrics, read from the database at scrape time, so every worker process counts.

Labels are calling AE titles, findings, states, queue names and model versions only: never a
patient, study or accession identifier.  Counters are totals over the studies the database
holds (they fall if old studies are purged).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import TERMINAL_STATES, Export, ExportState, Study, StudyState
from models.findings import FINDING_NAMES

# Seconds from the end of the push to the committed priority (triage devices' "time to notification").
TIME_TO_PRIORITY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def time_to_priority(session: Session) -> dict[str, tuple[list[int], int, float]]:
    """Per calling AE: cumulative counts per bucket, the count and the sum, from one query."""
    t = Study.time_to_priority_s
    columns = [func.sum(case((t <= b, 1), else_=0)) for b in TIME_TO_PRIORITY_BUCKETS]
    rows = session.execute(
        select(Study.calling_ae, func.count(), func.sum(t), *columns).where(t.is_not(None)).group_by(Study.calling_ae)
    ).all()
    return {str(r[0]): ([int(v or 0) for v in r[3:]], int(r[1]), float(r[2] or 0.0)) for r in rows}


class DatabaseCollector(Collector):
    def __init__(self, factory: sessionmaker[Session], queue_depths: dict[str, int | None]) -> None:
        self.factory = factory
        self.queue_depths = queue_depths

    def collect(self) -> Iterator[Metric]:
        with self.factory() as session:
            yield from self._histogram(session)
            yield from self._studies(session)
            yield from self._flags(session)
            yield from self._exports(session)
        depth = GaugeMetricFamily("xray_triage_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, n in self.queue_depths.items():
            if n is not None:
                depth.add_metric([queue], n)
        yield depth

    def _histogram(self, session: Session) -> Iterator[Metric]:
        h = HistogramMetricFamily(
            "xray_triage_time_to_priority_seconds",
            "From the end of the push (association release, else last instance) to the committed priority",
            labels=["calling_ae"],
        )
        for ae, (cumulative, count, total) in sorted(time_to_priority(session).items()):
            buckets: list[tuple[str, float]] = [
                (repr(b), c) for b, c in zip(TIME_TO_PRIORITY_BUCKETS, cumulative, strict=True)
            ]
            buckets.append(("+Inf", count))
            h.add_metric([ae], buckets, total)
        yield h

    def _studies(self, session: Session) -> Iterator[Metric]:
        counts: dict[str, int] = {
            str(s): int(n) for s, n in session.execute(select(Study.state, func.count()).group_by(Study.state))
        }
        finished = CounterMetricFamily("xray_triage_studies", "Studies that reached a final state", labels=["state"])
        current = GaugeMetricFamily("xray_triage_studies_in_state", "Studies per current state", labels=["state"])
        for state in StudyState:
            if state in TERMINAL_STATES:
                finished.add_metric([state.value], counts.get(state.value, 0))
            current.add_metric([state.value], counts.get(state.value, 0))
        yield finished
        yield current

    def _flags(self, session: Session) -> Iterator[Metric]:
        flagged = CounterMetricFamily(
            "xray_triage_findings_flagged",
            "Scored studies with the finding flagged at the site's threshold",
            labels=["finding", "model"],
        )
        for name in FINDING_NAMES:
            rows = session.execute(
                select(Study.model_ref, func.count())
                .where(Study.state == StudyState.SCORED, Study.flagged_findings.like(f"%,{name},%"))
                .group_by(Study.model_ref)
            ).all()
            for model, n in rows:
                flagged.add_metric([name, str(model or "")], int(n))
        yield flagged

    def _exports(self, session: Session) -> Iterator[Metric]:
        rows = {str(st): int(n) for st, n in session.execute(select(Export.state, func.count()).group_by(Export.state))}
        exports = GaugeMetricFamily("xray_triage_exports", "Exports per state", labels=["state"])
        for state in ExportState:
            exports.add_metric([state.value], rows.get(state.value, 0))
        yield exports
        failures = dict(
            session.execute(
                select(Export.destination, func.count())
                .where(Export.state == ExportState.FAILED)
                .group_by(Export.destination)
            ).all()
        )
        failed = CounterMetricFamily(
            "xray_triage_export_failures", "Exports that ran out of attempts", labels=["destination"]
        )
        for destination, n in sorted(failures.items()):
            failed.add_metric([str(destination)], int(n))
        yield failed


def render(factory: sessionmaker[Session], queue_depths: dict[str, Any]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(factory, queue_depths))
    return generate_latest(registry)
