"""Fixtures for the listener, hand-off and worker suites: real servers, real peers.

Two backends, selected per test by the `backend` fixture's parameter:

* ``sqlite``: a fresh SQLite file and the embedded kombu SQL broker under the test's tmp_path;
* ``postgres``: a database ``xt_<random>`` created on the local PostgreSQL for this session
  (dropped at the end, tables truncated between tests) and the local Redis, with queue names
  unique to the test so concurrent or earlier runs never mix messages.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import select
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest

from db.session import make_engine, upgrade
from settings import Settings
from tests.conftest import free_port, pydicom_data_file, shared_file

PG_ADMIN_URL = os.environ.get("XT_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_URL = os.environ.get("XT_TEST_REDIS", "redis://127.0.0.1:6379/0")
SESSION_TAG = secrets.token_hex(4)
AE_TITLE = "XRAY_TRIAGE"

# storescu option that proposes a file's own transfer syntax, so DCMTK sends it unconverted.
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}

RG_FILES = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm")
SHARED_DICOM = (
    "siim_cr_chest_pa_jpeg_baseline.dcm",
    "nema_cr_mono1_10bit_chest_no_meta.dcm",
    "dx_for_presentation_animal_lateral.dcm",
)


# --------------------------------------------------------------------------- helpers


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; generous deadline, fails with a message, never asserts speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


def real_files() -> list[Path]:
    """Every real DICOM file the suite pushes: shared/data/dicom and the pydicom-data RG1/RG3 set."""
    return [shared_file("dicom", name) for name in SHARED_DICOM] + [pydicom_data_file(n) for n in RG_FILES]


def transfer_syntax_of(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", None) or "1.2.840.10008.1.2")


def dataset_bytes(data: bytes) -> bytes:
    """The dataset part of a Part-10 file (after preamble and file meta), or all of a bare dataset."""
    if data[128:132] != b"DICM":
        return data
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def storescu(
    port: int,
    files: list[Path],
    *,
    aec: str = AE_TITLE,
    aet: str = "STORESCU",
    extra: tuple[str, ...] = (),
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, proposing the files' own transfer syntax (all files must share it)."""
    options = {STORESCU_TS_OPTION.get(transfer_syntax_of(f), "-xe") for f in files}
    assert len(options) == 1, "send files of one transfer syntax per storescu call"
    cmd = ["storescu", "-d", "-aet", aet, "-aec", aec, *options, *extra, host, str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def dimse_statuses(stderr: str) -> list[int]:
    """The C-STORE/C-ECHO response statuses in `storescu -d` / `echoscu -d` output, in order."""
    return [int(m, 16) for m in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", stderr)]


def echoscu(port: int, *, aec: str = AE_TITLE, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60
    )


def pynetdicom_store(
    port: int, path: Path, sop_class: str, transfer_syntax: str, aet: str = "PYSCU", abort: bool = False
) -> Any:
    """Send a file's dataset bytes exactly as they are on disk (pynetdicom streams them unparsed);
    then release the association, or abort it (a sender that crashed or gave up)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=aet)
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established, "association with the listener failed"
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.abort() if abort else assoc.release()


# --------------------------------------------------------------------------- queued messages


@dataclass(frozen=True)
class Queued:
    study_uid: str
    generation: int
    queue: str


def _decode_message(raw: str | bytes, queue: str) -> Queued:
    message = json.loads(raw)
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    assert message["headers"]["task"] == "xray_triage.process_study"
    return Queued(str(args[0]), int(args[1]), queue)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    database_url: str
    broker_url: str
    urgent: str
    routine: str
    extra_cleanup: list[Callable[[], None]] = field(default_factory=list)

    def queued(self) -> list[Queued]:
        """Every message waiting in this test's two queues (read without consuming)."""
        out: list[Queued] = []
        if self.broker_url.startswith("redis"):
            import redis

            client = redis.Redis.from_url(self.broker_url)
            for queue in (self.urgent, self.routine):
                out += [_decode_message(m, queue) for m in client.lrange(queue, 0, -1)]
            return out
        path = self.broker_url.removeprefix("sqla+sqlite:///")
        if not Path(path).exists():
            return out
        with sqlite3.connect(path) as conn:
            try:
                rows = conn.execute(
                    "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                    "WHERE m.visible = 1 ORDER BY m.id"
                ).fetchall()
            except sqlite3.OperationalError:  # no message published yet: tables not created
                return out
        return [_decode_message(payload, name) for name, payload in rows if name in (self.urgent, self.routine)]

    def settings(self, tmp_path: Path, **sections: dict[str, Any]) -> Settings:
        data: dict[str, Any] = {
            "listener": {"ae_title": AE_TITLE, "bind_address": "127.0.0.1", "port": free_port(), "max_pdu": 262144},
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 64},
            "database": {"url": self.database_url},
            "broker": {"url": self.broker_url},
            "queues": {"urgent": self.urgent, "routine": self.routine},
            "handoff": {"stability_window_s": 0.5, "poll_interval_s": 0.1},
            "web": {"port": free_port()},
            "log_level": "INFO",
        }
        for name, values in sections.items():
            data[name] = {**data.get(name, {}), **values}
        return Settings.model_validate(data)


class PostgresServer:
    """One database for the whole session, created fresh and dropped at the end."""

    def __init__(self) -> None:
        from sqlalchemy import text

        self.name = f"xt_{SESSION_TAG}"
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        admin.dispose()
        self.url = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{self.name}"
        upgrade(self.url)
        self.engine = make_engine(self.url)

    def url_via(self, host: str, port: int) -> str:
        return f"postgresql+psycopg://postgres@{host}:{port}/{self.name}"

    def truncate(self) -> None:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            conn.execute(text("TRUNCATE instance, series, state_transition, study RESTART IDENTITY CASCADE"))

    def drop(self) -> None:
        from sqlalchemy import text

        self.engine.dispose()
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.drop()


_counter = iter(range(1, 1_000_000))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """SQLite + embedded broker, or PostgreSQL + Redis; the test runs once for each."""
    n = next(_counter)
    urgent, routine = f"xt-{SESSION_TAG}-{n}.urgent", f"xt-{SESSION_TAG}-{n}.routine"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'xray-triage.db'}"
        upgrade(url)
        yield Backend("sqlite", url, f"sqla+sqlite:///{tmp_path / 'broker.db'}", urgent, routine)
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    server.truncate()
    b = Backend("postgres", server.url, REDIS_URL, urgent, routine)
    try:
        yield b
    finally:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.delete(urgent, routine)
        for cleanup in b.extra_cleanup:
            cleanup()


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    """Only the embedded configuration, for tests whose subject does not depend on the backend."""
    n = next(_counter)
    url = f"sqlite:///{tmp_path / 'xray-triage.db'}"
    upgrade(url)
    return Backend("sqlite", url, f"sqla+sqlite:///{tmp_path / 'broker.db'}", f"xt-{n}.urgent", f"xt-{n}.routine")


@pytest.fixture
def start_listener() -> Iterator[Callable[..., Any]]:
    """Start listeners in background threads; all are stopped at teardown."""
    from xray_triage.services import start_intake

    handles: list[Any] = []

    def _start(settings: Settings, with_handoff: bool = True) -> Any:
        handle = start_intake(settings, with_handoff=with_handoff)
        handles.append(handle)
        return handle

    yield _start
    for handle in handles:
        handle.stop()


@pytest.fixture
def log_text(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """Everything logged during the test at every level, for checks on what the logs contain."""
    caplog.set_level(logging.DEBUG)
    return lambda: caplog.text


# --------------------------------------------------------------------------- a TCP proxy we can cut


class TcpProxy:
    """Loopback TCP forwarder that can be cut (listening socket closed, live connections reset) and restored."""

    def __init__(self, target: tuple[str, int], record: bool = False, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = free_port()
        # Bytes the clients sent, in order, when recording (one client at a time).
        self.recorded = bytearray() if record else None
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.host, self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for src in readable:
                    data = src.recv(262144)
                    if not data:
                        return
                    if src is a and self.recorded is not None:
                        self.recorded += data
                    (b if src is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening.
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.cut()


def wire_datasets(stream: bytes) -> list[bytes]:
    """The C-STORE datasets in a recorded association stream, reassembled from P-DATA-TF PDVs (PS3.8 9.3.5)."""
    datasets: list[bytes] = []
    current = bytearray()
    pos = 0
    while pos + 6 <= len(stream):
        pdu_type = stream[pos]
        length = int.from_bytes(stream[pos + 2 : pos + 6], "big")
        body = stream[pos + 6 : pos + 6 + length]
        pos += 6 + length
        if pdu_type != 0x04:
            continue
        item = 0
        while item + 4 <= len(body):
            item_length = int.from_bytes(body[item : item + 4], "big")
            pdv = body[item + 5 : item + 4 + item_length]  # skip the presentation context ID
            item += 4 + item_length
            control, data = pdv[0], pdv[1:]
            if control & 0x01:
                continue  # command fragment
            current += data
            if control & 0x02:
                datasets.append(bytes(current))
                current = bytearray()
    return datasets
