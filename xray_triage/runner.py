"""Process management: a Celery worker, and `run` = listener + worker + web app as child processes.

`run` is what a newcomer starts (`make run`), so it prints where to push and stops both
children cleanly on Ctrl-C; in production the two are separate services.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from settings import Settings

log = logging.getLogger("xray_triage.runner")

STOP_GRACE_S = 15.0
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


def run_all(settings: Settings, config_path: str | None = None, concurrency: int = 1) -> int:
    """Listener, worker and web app as child processes; returns when one exits or on Ctrl-C/SIGTERM."""
    cfg = settings.listener
    web = settings.web
    children = [
        subprocess.Popen(_child_command(config_path, "listen")),
        subprocess.Popen(_child_command(config_path, "worker", "--concurrency", str(concurrency))),
        subprocess.Popen(_child_command(config_path, "web")),
    ]
    print(
        f"xray-triage is running. Push DICOM to AE title {cfg.ae_title} at {cfg.bind_address}:{cfg.port}\n"
        f"  e.g. storescu -aec {cfg.ae_title} {cfg.bind_address} {cfg.port} image.dcm\n"
        f"Worklist: http://{web.bind_address}:{web.port}/ (add a user first: xray-triage user add NAME --role admin)\n"
        "Ctrl-C stops the listener, the worker and the web app.",
        flush=True,
    )
    terminated = False

    def _on_term(signum: int, _frame: object) -> None:
        nonlocal terminated
        terminated = True

    # Ctrl-C reaches the whole process group: a child may stop before this process has seen the
    # signal, so SIGINT is a flag too, and a child's exit gets a moment to turn out to be that.
    previous = {sig: signal.signal(sig, _on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while not terminated:
            exited = [c for c in children if c.poll() is not None]
            if exited:
                time.sleep(SIGNAL_GRACE_S)
                if not terminated:
                    code = exited[0].returncode or 1
                    log.error("a child process exited with status %s; stopping the others", exited[0].returncode)
                break
            time.sleep(0.5)
    finally:
        _stop(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
