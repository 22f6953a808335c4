"""Fixtures for the worklist web app suites: the real app (``create_app``) over a migrated database.

Runs on both backends of ``tests.plugins.ingest`` (SQLite + embedded broker, PostgreSQL +
Redis).  Studies and users are written straight into the database with the ORM, the way the
listener, the worker and ``xray-triage user add`` write them; the app is driven with FastAPI's
TestClient, so every request goes through the real middleware, session cookie and CSRF checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Series, Study, User, WorkerHeartbeat, utcnow
from db.session import make_engine, make_sessionmaker, session_scope, upgrade
from settings import Settings
from tests.plugins.ingest import Backend

PASSWORD = "correct horse battery staple"
_CSRF_FIELD_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    """The CSRF token of a rendered page's forms."""
    match = _CSRF_FIELD_RE.search(html)
    assert match, "the page has no csrf_token field"
    return match.group(1)


@dataclass
class WorklistApp:
    """One app over the test's database, with helpers to fill the database and log in."""

    backend: Backend
    settings: Settings
    app: FastAPI
    engine: Engine
    factory: sessionmaker[Session]
    clients: list[TestClient] = field(default_factory=list)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.factory) as s:
            yield s

    def client(self) -> TestClient:
        """A fresh browser: its own cookie jar, redirects not followed (tests look at them)."""
        c = TestClient(self.app, follow_redirects=False)
        self.clients.append(c)
        return c

    def add_user(self, username: str, role: str = "radiologist", password: str = PASSWORD) -> int:
        from worklist.users import add_user

        with self.session() as s:
            return int(add_user(s, username, password, role).id)

    def set_disabled(self, username: str, disabled: bool = True) -> None:
        with self.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            assert user is not None
            user.disabled = disabled

    def add_study(
        self,
        uid: str,
        *,
        priority: int | None = 2,
        ai_priority: int | None = None,
        age_min: float = 10.0,
        now: datetime | None = None,
        state: str | None = None,
        flagged: tuple[str, ...] = (),
        top_finding: str | None = None,
        top_score: float | None = None,
        read_state: str = "unread",
        calling_ae: str = "CR_ROOM1",
        study_date: str | None = "20240315",
        patient_name: str | None = None,
        patient_id: str | None = None,
        modality: str | None = "CR",
        view: str | None = "PA",
        state_reason: str | None = None,
    ) -> int:
        """A study as the worker leaves it; returns its id.  `state` defaults to scored (pending if no priority)."""
        now = now or utcnow()
        received = now - timedelta(minutes=age_min)
        if state is None:
            state = "queued" if priority is None else "scored"
        with self.session() as s:
            study = Study(
                study_uid=uid,
                calling_ae=calling_ae,
                patient_name=patient_name if patient_name is not None else f"DOE^{uid.replace('.', '')}",
                patient_id=patient_id if patient_id is not None else f"PID{uid.replace('.', '')}",
                study_date=study_date,
                received_at=received,
                last_instance_at=received,
                state_changed_at=received,
                state=state,
                state_reason=state_reason,
                priority=priority,
                ai_priority=priority if ai_priority is None else ai_priority,
                priority_reason=None if priority is None else f"level {priority}",
                top_finding=top_finding if top_finding is not None else (flagged[0] if flagged else None),
                top_score=top_score if top_score is not None else (0.8 if flagged else None),
                flagged_findings=f",{','.join(flagged)}," if flagged else None,
                read_state=read_state,
                finished_at=received + timedelta(minutes=1) if state in ("scored", "failed", "ineligible") else None,
            )
            s.add(study)
            s.flush()
            if modality is not None or view is not None:
                s.add(Series(series_uid=f"{uid}.1", study_id=study.id, modality=modality, view_position=view))
            return int(study.id)

    def beat(self, name: str = "worker@test:1", age_s: float = 0.0) -> None:
        """A worker heartbeat row, `age_s` seconds old."""
        seen = utcnow() - timedelta(seconds=age_s)
        with self.session() as s:
            s.merge(
                WorkerHeartbeat(
                    name=name,
                    hostname="test",
                    pid=1,
                    queues=f"{self.settings.queues.urgent},{self.settings.queues.routine}",
                    model_ref="test-model",
                    started_at=seen,
                    last_seen_at=seen,
                    tasks_done=3,
                )
            )

    def audit(self) -> list[AuditEvent]:
        with self.session() as s:
            return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))

    def study(self, uid: str) -> Study:
        with self.session() as s:
            found = s.scalar(select(Study).where(Study.study_uid == uid))
            assert found is not None
            return found

    def login(self, client: TestClient, username: str, password: str = PASSWORD) -> str:
        """Log in through the API; returns the session's CSRF token."""
        r = client.post("/api/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["csrf_token"])

    def logged_in(self, username: str, role: str = "radiologist") -> tuple[TestClient, str]:
        """A new user and a browser logged in as them, with the CSRF token."""
        self.add_user(username, role)
        c = self.client()
        return c, self.login(c, username)


def _clean_worklist_tables(backend: Backend) -> None:
    """The PostgreSQL database lives for the session: empty what the ingest fixture does not."""
    if backend.name != "postgres":
        return
    engine = make_engine(backend.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE app_user, audit_event, worker_heartbeat RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture
def make_worklist(backend: Backend, tmp_path: Path) -> Iterator[Callable[..., WorklistApp]]:
    """Build the app from ``backend.settings(tmp_path, **sections)``; several apps may share the database."""
    from worklist.app import create_app

    upgrade(backend.database_url)
    _clean_worklist_tables(backend)
    made: list[WorklistApp] = []

    def _make(**sections: dict[str, Any]) -> WorklistApp:
        settings = backend.settings(tmp_path, **sections)
        app = create_app(settings)
        engine = make_engine(settings.database.url)
        made.append(WorklistApp(backend, settings, app, engine, make_sessionmaker(engine)))
        return made[-1]

    yield _make
    for wl in made:
        for c in wl.clients:
            c.close()
        wl.engine.dispose()
        wl.app.state.engine.dispose()


@pytest.fixture
def worklist(make_worklist: Callable[..., WorklistApp]) -> WorklistApp:
    """The app with the default configuration (a sample site's settings on this backend)."""
    return make_worklist()
