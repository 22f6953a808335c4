"""Is a service of ours answering?  Used by `run` before it says "running" and by `xray-triage
health` (the container healthchecks), so both judge a service the same way.

Each probe returns what it saw in words, or raises ``ServiceDown`` saying what failed: a
healthcheck log that reads "nothing listens on 127.0.0.1:11112" needs no interpretation.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from settings.config import ListenerConfig, WebConfig


class ServiceDown(RuntimeError):
    """The service did not answer as it should."""


def listener(cfg: ListenerConfig, timeout_s: float = 5.0) -> str:
    """A real C-ECHO (a rejection of the probe's AE title still proves the listener serves)."""
    from dicom_io.echo import ListenerDown, echo_listener

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the probe's own association is not news
    try:
        return echo_listener(cfg, timeout_s=timeout_s)
    except (ListenerDown, OSError) as exc:
        raise ServiceDown(str(exc)) from None


def web_health(cfg: WebConfig, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    """The web app's /healthz: its HTTP status and JSON body (503 still means the app answers)."""
    host = cfg.bind_address if cfg.bind_address not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{cfg.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        raise ServiceDown(f"nothing answers {url}: {getattr(exc, 'reason', None) or exc}") from None
    try:
        report = json.loads(body)
    except ValueError:
        raise ServiceDown(f"{url} answered HTTP {status} without a health report: not the worklist app") from None
    if not isinstance(report, dict) or "checks" not in report:
        raise ServiceDown(f"{url} answered HTTP {status} without a health report: not the worklist app")
    return status, report
