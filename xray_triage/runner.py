"""Process management: a Celery worker, and `run` = listener + worker + web app as child processes.

`run` is what a newcomer starts (`make run`), so it prints where to push once the ports
answer, restarts a child that crashes, and stops all of them cleanly on Ctrl-C; in
production they may be separate services under the site's own supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from settings import Settings

log = logging.getLogger("xray_triage.runner")

STOP_GRACE_S = 15.0
# A child that ran this long is healthy again: its next crash restarts it after 1 s.
STABLE_AFTER_S = 60.0
RESTART_MAX_S = 60.0
STARTUP_TIMEOUT_S = 300.0
# After a child exits, how long to wait for a Ctrl-C or SIGTERM that stopped it to reach us too.
SIGNAL_GRACE_S = 1.0


def worker_argv(settings: Settings, queues: Sequence[str], concurrency: int) -> list[str]:
    """Arguments for celery's worker_main.

    Gossip, mingle and heartbeats need broadcast support the embedded SQL transport lacks,
    and a triage worker needs none of them.
    """
    return [
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        str(max(1, concurrency)),
        "--pool",
        "prefork",
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"xray-triage-{os.getpid()}@%h",
    ]


def run_worker(settings: Settings, queues: Sequence[str], concurrency: int = 1) -> int:
    """Run a Celery worker in this process until it is stopped (blocking)."""
    from broker import make_celery
    from worker.tasks import register_tasks

    app = make_celery(settings)
    register_tasks(app, settings)
    app.worker_main(worker_argv(settings, queues, concurrency))
    return 0


def _child_command(config_path: str | None, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "xray_triage.cli"]
    if config_path:
        cmd += ["--config", config_path]
    return [*cmd, *args]


def _stop(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@dataclass
class Child:
    """One supervised process: what it is called in the log, how to start it, its restarts."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.started_at = time.monotonic()
        self.restart_at = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `run` itself dies, even by kill -9 (prctl
    PR_SET_PDEATHSIG), so a killed supervisor never leaves a listener holding the port."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def restart_delay(failures: int) -> float:
    """Backoff after the n-th crash in a row: 1, 2, 4 ... seconds, at most RESTART_MAX_S."""
    return float(min(RESTART_MAX_S, 2 ** max(0, failures - 1)))


def _answers(probe: Callable[[], object]) -> bool:
    from xray_triage.probes import ServiceDown

    try:
        probe()
        return True
    except ServiceDown:
        return False


def run_all(settings: Settings, config_path: str | None = None, concurrency: int = 1) -> int:
    """Listener, worker and web app as supervised child processes, until Ctrl-C or SIGTERM (exit 0).

    "Running" is printed once the listener answers an association and the web app /healthz.  A child that
    exits before that (a port in use, a bad setting) stops everything with its status; one
    that crashes later is restarted with backoff and the restart is logged, so one dead
    process does not take the others down, nor stay dead.
    """
    cfg = settings.listener
    web = settings.web
    children = [
        Child("DICOM listener", _child_command(config_path, "listen")),
        Child("worker", _child_command(config_path, "worker", "--concurrency", str(concurrency))),
        Child("web app", _child_command(config_path, "web")),
    ]
    if settings.export.destinations:
        # Results go out from their own worker processes, so a dead destination never delays scoring.
        children.insert(
            2,
            Child(
                "exporter",
                _child_command(
                    config_path,
                    "worker",
                    "--queues",
                    settings.export.queue,
                    "--concurrency",
                    str(settings.export.concurrency),
                ),
            ),
        )
    terminated = False

    def _on_term(signum: int, _frame: object) -> None:
        nonlocal terminated
        terminated = True

    # Ctrl-C reaches the whole process group: a child may stop before this process has seen the
    # signal, so SIGINT is a flag too, and a child's exit gets a moment to turn out to be that.
    previous = {sig: signal.signal(sig, _on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    for child in children:
        child.start()
    try:

        def up() -> bool:
            from xray_triage import probes

            return _answers(lambda: probes.listener(cfg)) and _answers(lambda: probes.web_health(web, timeout_s=2.0))

        code = _wait_until_up(children, up, lambda: terminated)
        if code is not None:
            return code
        print(
            f"xray-triage is running. Push DICOM to AE title {cfg.ae_title} at {cfg.bind_address}:{cfg.port}\n"
            f"  e.g. storescu -aec {cfg.ae_title} {cfg.bind_address} {cfg.port} image.dcm\n"
            f"Worklist: http://{web.bind_address}:{web.port}/"
            " (add a user first: xray-triage user add NAME --role admin)\n"
            "Ctrl-C stops the listener, the worker and the web app.",
            flush=True,
        )
        _supervise(children, lambda: terminated)
        return 0
    finally:
        _stop([c.proc for c in children if c.proc is not None])
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_until_up(children: list[Child], up: Callable[[], bool], stopped: Callable[[], bool]) -> int | None:
    """None once the listener and the web app answer; else the exit status to end `run` with (0 if signalled)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not up():
        if stopped():
            return 0
        for child in children:
            assert child.proc is not None
            if child.proc.poll() is not None:
                time.sleep(SIGNAL_GRACE_S)
                if stopped():
                    return 0
                log.error("the %s did not start (exit status %s); stopping", child.name, child.proc.returncode)
                return child.proc.returncode or 1
        if time.monotonic() > deadline:
            log.error("the listener and the web app did not answer within %.0f s; stopping", STARTUP_TIMEOUT_S)
            return 1
        time.sleep(0.2)
    return None


def _supervise(children: list[Child], stopped: Callable[[], bool]) -> None:
    while not stopped():
        now = time.monotonic()
        for child in children:
            assert child.proc is not None
            if child.restart_at is not None:
                if now >= child.restart_at:
                    log.warning("restarting the %s", child.name)
                    child.start()
                continue
            status = child.proc.poll()
            if status is None:
                if now - child.started_at > STABLE_AFTER_S:
                    child.failures = 0
                continue
            time.sleep(SIGNAL_GRACE_S)
            if stopped():
                return
            child.failures += 1
            delay = restart_delay(child.failures)
            log.error("the %s exited with status %s; restarting it in %.0f s", child.name, status, delay)
            child.restart_at = time.monotonic() + delay
        time.sleep(0.5)
