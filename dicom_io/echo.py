"""Is the DICOM listener answering?  A real C-ECHO, for /healthz and for `run`'s start-up.

A port that accepts TCP proves little (another program, a listener whose threads are stuck);
an association answered by the listener proves it serves.  A rejection (the probe's AE title
is not in ``listener.allowed_callers``) still proves that: the listener read, judged and
answered.  With DICOM TLS configured the probe has no client certificate, so there an open
port is all it can show, and it says so.
"""

from __future__ import annotations

import logging
import socket

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

from settings.config import ListenerConfig

PROBE_AE_TITLE = "XT_HEALTH"


class ListenerDown(RuntimeError):
    """Nothing answered at the listener's address."""


def probe_address(cfg: ListenerConfig) -> tuple[str, int]:
    if cfg.probe_host:
        return cfg.probe_host, cfg.port
    host = cfg.bind_address if cfg.bind_address not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return host, cfg.port


def echo_listener(cfg: ListenerConfig, timeout_s: float = 3.0) -> str:
    """What the listener answered, in words; ListenerDown when nothing did."""
    host, port = probe_address(cfg)
    if cfg.tls is not None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return "TLS port open (no C-ECHO: the probe has no client certificate)"
        except OSError as exc:
            raise ListenerDown(f"nothing listens on {host}:{port}: {exc.strerror or exc}") from None
    logging.getLogger("pynetdicom").setLevel(max(logging.getLogger("pynetdicom").level, logging.WARNING))
    ae = AE(ae_title=PROBE_AE_TITLE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=cfg.ae_title)
    if assoc.is_rejected:
        return "association rejected (the probe's AE title is not an allowed caller): the listener answers"
    if not assoc.is_established:
        raise ListenerDown(f"no DICOM association with {cfg.ae_title} at {host}:{port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        raise ListenerDown(f"C-ECHO answered {'nothing' if code is None else f'0x{code:04X}'}")
    return "C-ECHO success"
