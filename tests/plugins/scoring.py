"""Fixtures for the scoring suites: a listener and a real Celery worker per backend, shared by a module.

A worker process loads TensorFlow and the model (tens of seconds on a busy 2-core box), so
one worker per backend serves every test of a module; tests keep apart by pushing studies
with their own UIDs.  On PostgreSQL the worker reaches the database through a loopback proxy
the outage test can cut, while the listener connects directly.  The model is the configured
default (``models/default``, or ``$XRAY_TRIAGE_MODEL``), exactly what production loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from sqlalchemy import select, text

from db.models import InstanceResult, StateTransition, Study, StudyState
from db.session import make_engine, make_sessionmaker, upgrade
from settings import Settings
from tests.conftest import REPO, free_port
from tests.plugins.ingest import AE_TITLE, PG_ADMIN_URL, PG_HOST, PG_PORT, REDIS_URL, SESSION_TAG, TcpProxy, storescu
from tests.plugins.ingest import wait_for as wait_for

FINAL = (StudyState.SCORED, StudyState.INELIGIBLE, StudyState.FAILED)


def scoring_settings(database_url: str, broker_url: str, var: Path, tag: str, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "listener": {"ae_title": AE_TITLE, "bind_address": "127.0.0.1", "port": free_port(), "max_pdu": 262144},
        "storage": {"spool_dir": str(var / "spool"), "min_free_mb": 64},
        "database": {"url": database_url},
        "broker": {"url": broker_url},
        "queues": {"urgent": f"xt-sc-{tag}.urgent", "routine": f"xt-sc-{tag}.routine"},
        # Short waits, so the export tests see retries and export_failed within seconds.
        "export": {
            "queue": f"xt-sc-{tag}.export",
            "retry_base_s": 0.5,
            "retry_cap_s": 2.0,
            "max_attempts": 3,
            "timeout_s": 5.0,
        },
        "handoff": {"stability_window_s": 0.5, "poll_interval_s": 0.2},
        # Short enough for the outage tests, long enough that a busy box never re-queues a live task.
        "worker": {
            "heatmap_dir": str(var / "heatmaps"),
            "retry_base_s": 0.5,
            "retry_cap_s": 4.0,
            "queued_timeout_s": 15.0,
            "processing_timeout_s": 120.0,
            "sweep_interval_s": 1.0,
        },
        "log_level": "INFO",
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings.model_validate(data)


def write_config(settings: Settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    return path


class WorkerProcess:
    """`xray-triage worker` as a child process, its output in a log file the tests can read."""

    def __init__(self, config: Path, log_path: Path, concurrency: int = 1, queues: str | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xray_triage.cli",
                "--config",
                str(config),
                "worker",
                "--concurrency",
                str(concurrency),
                *(["--queues", queues] if queues else []),
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill_all reaches the main process and the pool
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_children(self) -> list[int]:
        """PIDs of the prefork pool processes (where tasks run)."""
        try:
            raw = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in raw.split()]

    def kill_all(self) -> None:
        """kill -9 of the whole worker: the Celery main process and every pool child, at once."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(60)

    def stop(self) -> int:
        if self.proc.poll() is not None:
            try:  # the main process is gone; leave no orphaned pool child behind
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@dataclass
class ScoringEnv:
    """A listener (with hand-off and sweeper) and one worker on one backend."""

    name: str
    settings: Settings
    var: Path
    worker: WorkerProcess | None = None
    listener: Any = None
    proxy: TcpProxy | None = None
    worker_database_url: str | None = None  # where the worker reaches the database (the proxy), if not direct
    cleanup: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.factory = make_sessionmaker(make_engine(self.settings.database.url))

    def push(self, files: list[Path], **kw: Any) -> None:
        result = storescu(self.listener.port, files, **kw)
        assert result.returncode == 0, result.stderr[-2000:]

    def study(self, uid: str) -> Study:
        with self.factory() as s:
            return s.scalars(select(Study).where(Study.study_uid == uid)).one()

    def results(self, uid: str) -> list[InstanceResult]:
        with self.factory() as s:
            return list(
                s.scalars(select(InstanceResult).join(Study).where(Study.study_uid == uid).order_by(InstanceResult.id))
            )

    def states(self, uid: str) -> list[str]:
        with self.factory() as s:
            rows = s.execute(
                select(StateTransition.to_state).join(Study).where(Study.study_uid == uid).order_by(StateTransition.id)
            ).all()
        return [r[0] for r in rows]

    def transition_reasons(self, uid: str) -> list[str | None]:
        with self.factory() as s:
            rows = s.execute(
                select(StateTransition.reason).join(Study).where(Study.study_uid == uid).order_by(StateTransition.id)
            ).all()
        return [r[0] for r in rows]

    def state_of(self, uid: str) -> StudyState | None:
        with self.factory() as s:
            value = s.scalar(select(Study.state).where(Study.study_uid == uid))
        return StudyState(value) if value is not None else None

    def wait_final(self, uid: str, timeout: float = 240.0) -> Study:
        wait_for(lambda: self.state_of(uid) in FINAL, timeout=timeout, interval=0.3,
                 what=f"study {uid} to reach a final state")  # fmt: skip
        return self.study(uid)


def start_env_worker(
    env: ScoringEnv, database_url: str | None = None, concurrency: int = 1, queues: str | None = None
) -> WorkerProcess:
    """Start a worker for `env`, optionally reaching the database through another URL (a proxy)."""
    settings = env.settings
    database_url = database_url or env.worker_database_url
    if database_url is not None:
        settings = settings.model_copy(update={"database": settings.database.model_copy(update={"url": database_url})})
    config = write_config(settings, env.var / f"worker-{len(env.cleanup)}.yaml")
    worker = WorkerProcess(config, env.var / ("exporter.log" if queues else "worker.log"), concurrency, queues)
    env.cleanup.append(worker.stop)
    return worker


class ScoringDatabase:
    """A PostgreSQL database of its own for the scoring suites (the ingest suites truncate theirs)."""

    def __init__(self, suffix: str) -> None:
        self.name = f"xt_{SESSION_TAG}_{suffix}"
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        admin.dispose()
        self.url = self.url_via(PG_HOST, PG_PORT)
        upgrade(self.url)

    def url_via(self, host: str, port: int) -> str:
        return f"postgresql+psycopg://postgres@{host}:{port}/{self.name}"

    def drop(self) -> None:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def open_scoring_env(backend: str, var: Path, **sections: dict[str, Any]) -> Iterator[ScoringEnv]:
    """Listener + one worker on `backend` ("sqlite": SQLite + embedded broker; "postgres": PostgreSQL + Redis).

    `sections` override the scoring settings (e.g. ``triage={"silent_mode": True}``).
    """
    from xray_triage.services import start_intake

    # Queue names hold the tag and must fit in 64 characters: a digest of the folder, not its name.
    tag = f"{SESSION_TAG}-{backend}-{os.getpid()}-{hashlib.sha1(str(var).encode()).hexdigest()[:10]}"
    db: ScoringDatabase | None = None
    if backend == "sqlite":
        url = f"sqlite:///{var / 'xray-triage.db'}"
        upgrade(url)
        settings = scoring_settings(url, f"sqla+sqlite:///{var / 'broker.db'}", var, tag, **sections)
    else:
        db = ScoringDatabase(f"sc_{os.getpid()}_{var.name}".replace("-", "_"))
        settings = scoring_settings(db.url, REDIS_URL, var, tag, **sections)
    env = ScoringEnv(backend, settings, var)
    try:
        env.listener = start_intake(settings)
        if db is not None:
            env.proxy = TcpProxy((PG_HOST, PG_PORT))
            env.worker_database_url = db.url_via("127.0.0.1", env.proxy.port)
            env.worker = start_env_worker(env)
        else:
            env.worker = start_env_worker(env)
        yield env
    finally:
        for stop in reversed(env.cleanup):
            stop()
        if env.listener is not None:
            env.listener.stop()
        if env.proxy is not None:
            env.proxy.close()
        env.factory.kw["bind"].dispose()
        if db is not None:
            import redis

            redis.Redis.from_url(REDIS_URL).delete(
                settings.queues.urgent, settings.queues.routine, settings.export.queue
            )
            db.drop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def scoring_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScoringEnv]:
    """Listener + one worker per backend for the whole module: SQLite + embedded broker, PostgreSQL + Redis."""
    with open_scoring_env(request.param, tmp_path_factory.mktemp(f"scoring-{request.param}")) as env:
        yield env


def as_new_study(source: Path, out: Path, **attrs: Any) -> Path:
    """A copy of a real file under fresh Study/Series/SOP UIDs (and any attribute changes)."""
    ds = pydicom.dcmread(source, force=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    if "TransferSyntaxUID" not in ds.file_meta:  # a file without meta (the NEMA sample) is implicit VR LE
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def study_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).StudyInstanceUID)
