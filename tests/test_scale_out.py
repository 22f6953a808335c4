"""Several hosts, one database, one queue: a listener and two workers as separate processes on
separate "hosts" (network namespaces), against one PostgreSQL and one Redis reached over the
network.  50 studies are pushed; one worker is killed outright in the middle of a study; every
study must still be scored, and exactly once.

This is the deployment of the README's "Several hosts" section, scaled down onto one machine:
the root namespace plays the database host (Redis of its own bound to the bridge address;
the machine's PostgreSQL behind a forwarder on that address, as it listens on loopback only),
and the spool folder, shared by every host through a network file system in a real site, is
one folder here.  Celery does the distribution; the kill is caught by the sweeper from the
dead worker's missing heartbeat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Instance, InstanceResult, StateTransition, Study, StudyState
from db.session import make_engine, make_sessionmaker
from tests.conftest import REPO, free_port, pydicom_data_file
from tests.plugins.ingest import PG_HOST, PG_PORT, TcpProxy, storescu, wait_for
from tests.plugins.netns import Lab
from tests.plugins.scoring import ScoringDatabase, as_new_study, scoring_settings, study_uid_of, write_config

STUDIES = 50
LISTENER_PORT = 11112  # every host has its own ports: the standard one is free in a namespace
# Short, so the test sees a dead worker's study re-queued soon; the defaults are 15 s and 45 s.
HEARTBEAT_S = 1.0
DEAD_AFTER_S = 8.0


class Host:
    """An `xray-triage` command running on one host of the lab, output in a log file."""

    def __init__(self, lab: Lab, host: str, config: Path, log: Path, *args: str) -> None:
        self.host = host
        self.log = log
        with log.open("wb") as out:
            argv = [sys.executable, "-m", "xray_triage.cli", "--config", str(config), *args]
            self.proc = subprocess.Popen(
                lab.argv(host, argv), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def signal_all(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal_all(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.signal_all(signal.SIGKILL)  # and any pool child left behind
        self.proc.wait(60)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture
def redis_on(lab: Lab, tmp_path: Path) -> Iterator[str]:
    """One Redis server for every host, at the database host's address."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", lab.gateway, "--port", str(port), "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(host=lab.gateway, port=port)
        wait_for(lambda: _pings(client), timeout=30, what="redis on the bridge")
        yield f"redis://{lab.gateway}:{port}/0"
    finally:
        proc.terminate()
        proc.wait(30)


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_two_workers_on_two_hosts_score_every_study_exactly_once_when_one_is_killed(
    lab: Lab, redis_on: str, tmp_path: Path
) -> None:
    listener_ip = lab.add_host("listener")
    lab.add_host("w1")
    lab.add_host("w2")
    db = ScoringDatabase(f"scale_{os.getpid()}")
    forwarder = TcpProxy((PG_HOST, PG_PORT), host=lab.gateway)  # PostgreSQL at the database host's address
    hosts: list[Host] = []
    try:
        settings = scoring_settings(
            db.url_via(lab.gateway, forwarder.port),
            redis_on,
            tmp_path,
            f"scale-{lab.tag}",
            listener={"bind_address": listener_ip, "port": LISTENER_PORT},
            worker={
                "heartbeat_interval_s": HEARTBEAT_S,
                "dead_worker_after_s": DEAD_AFTER_S,
                "sweep_interval_s": 1.0,
                "queued_timeout_s": 600.0,  # only the dead worker's heartbeat may re-queue here
                "processing_timeout_s": 600.0,
            },
        )
        config = write_config(settings, tmp_path / "site.yaml")  # one configuration for every host
        hosts = [Host(lab, "listener", config, tmp_path / "listener.log", "listen")]
        workers = {name: Host(lab, name, config, tmp_path / f"{name}.log", "worker") for name in ("w1", "w2")}
        hosts += workers.values()
        factory = make_sessionmaker(make_engine(db.url))  # the test reads the database directly

        # Each process runs in its own host's namespace.
        for h in hosts:
            assert lab.namespace_of(h.proc.pid) == lab.namespace(h.host), h.host

        def heartbeats() -> set[str]:
            from db.models import WorkerHeartbeat

            with factory() as s:
                return {name.split(":")[0] for name in s.scalars(select(WorkerHeartbeat.name))}

        wait_for(lambda: heartbeats() >= {"w1", "w2"}, timeout=600, interval=1.0,
                 what=f"both workers to report\n{_tails(hosts)}")  # fmt: skip

        source = pydicom_data_file("RG1_UNCR.dcm")
        files = [as_new_study(source, tmp_path / "push" / f"{i:02d}.dcm") for i in range(STUDIES)]
        uids = [study_uid_of(f) for f in files]
        for batch in range(0, STUDIES, 10):  # five sending associations, from outside every host
            result = storescu(LISTENER_PORT, files[batch : batch + 10], host=listener_ip)
            assert result.returncode == 0, result.stderr[-2000:]

        victim_study = _kill_w1_mid_study(workers["w1"], factory)
        assert workers["w1"].proc.wait(60) is not None

        def final_count() -> int:
            with factory() as s:
                return int(
                    s.scalar(select(func.count()).select_from(Study).where(Study.state == StudyState.SCORED)) or 0
                )

        wait_for(lambda: final_count() == STUDIES, timeout=900, interval=1.0,
                 what=f"every study scored\n{_tails(hosts)}")  # fmt: skip

        with factory() as s:
            studies = {st.study_uid: st for st in s.scalars(select(Study))}
            assert set(studies) == set(uids)
            scored = Counter(
                uid
                for uid, to in s.execute(select(Study.study_uid, StateTransition.to_state).join(StateTransition))
                if to == StudyState.SCORED
            )
            results_per_instance = Counter(
                s.scalars(
                    select(Instance.sop_instance_uid).join(InstanceResult, InstanceResult.instance_id == Instance.id)
                )
            )
            victim = s.get(Study, victim_study)
            assert victim is not None
            reasons = list(
                s.scalars(
                    select(StateTransition.reason)
                    .where(StateTransition.study_id == victim.id)
                    .order_by(StateTransition.id)
                )
            )
        assert all(studies[u].state == StudyState.SCORED for u in uids)
        assert scored == Counter({u: 1 for u in uids}), "each study reaches `scored` exactly once"
        assert len(results_per_instance) == STUDIES and set(results_per_instance.values()) == {1}
        # The killed worker's study was re-queued for its missing heartbeat and finished on the other host.
        assert any("its worker's heartbeat stopped" in (r or "") for r in reasons), reasons
        assert str(victim.processing_by).startswith("w2:"), victim.processing_by
        listener_log = (tmp_path / "listener.log").read_text(errors="replace")
        assert listener_log.count(f"study {victim.study_uid} was processing too long: re-queued") == 1
        # Both hosts did work.
        w1_log, w2_log = ((tmp_path / f"{n}.log").read_text(errors="replace") for n in ("w1", "w2"))
        assert " scored" in w2_log or "succeeded" in w2_log, w2_log[-3000:]
        assert w1_log, "the killed worker had started"
    finally:
        for h in reversed(hosts):
            h.stop()
        forwarder.close()
        db.drop()


def _kill_w1_mid_study(w1: Host, factory: object) -> int:
    """Freeze w1 while a study is `processing` by it (so the kill lands mid-study), then kill -9
    the whole worker: the Celery main process and its pool.  Returns the study's id."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        busy = _processing_by(factory, "w1")
        if busy is not None:
            w1.signal_all(signal.SIGSTOP)
            if _processing_by(factory, "w1") == busy:  # still mid-study, now frozen
                w1.signal_all(signal.SIGKILL)
                return busy
            w1.signal_all(signal.SIGCONT)  # it finished between the two looks: try the next one
        time.sleep(0.05)
    raise AssertionError("worker w1 never took a study")


def _processing_by(factory: object, host: str) -> int | None:
    with factory() as s:  # type: ignore[operator]
        return s.scalar(  # type: ignore[no-any-return]
            select(Study.id).where(Study.state == StudyState.PROCESSING, Study.processing_by.like(f"{host}:%")).limit(1)
        )


def _tails(hosts: list[Host]) -> str:
    return "\n".join(f"--- {h.host}\n{h.log.read_text(errors='replace')[-1500:]}" for h in hosts)
