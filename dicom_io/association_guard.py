"""An association thread that ends with one log line, never with an uncaught exception.

A peer that aborts, drops or sends a malformed PDU at the wrong moment can move pynetdicom's
state machine on while the association thread is about to answer (an A-ASSOCIATE or A-RELEASE
response after the peer's abort); pynetdicom then raises ``InvalidEventError`` in that thread,
which dies with a traceback on stderr and without closing its socket.  The association is over
either way; these wrappers say so in one line and makes sure the transport is shut.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger("xray_triage.listener")

_guarded: weakref.WeakSet[Any] = weakref.WeakSet()
_install_lock = threading.Lock()
_original_run_reactor = Association.run_reactor
_original_dul_reactor = DULServiceProvider.run_reactor


def _guarded_run_reactor(self: Association) -> None:
    if self.ae not in _guarded:
        _original_run_reactor(self)
        return
    try:
        _original_run_reactor(self)
    except Exception as exc:  # noqa: BLE001 - the peer left pynetdicom's state machine behind; end cleanly
        log.warning("association from %s ended abnormally: %s: %s", self.requestor.address, type(exc).__name__, exc)
        self.is_aborted = True
        self.is_established = False
        sock = getattr(self.dul, "socket", None)
        server = getattr(self, "_server", None)
        if server is not None and sock is not None and getattr(sock, "socket", None) is not None:
            server.shutdown_request(sock.socket)
        self.dul.kill_dul()


def _guarded_dul_reactor(self: DULServiceProvider) -> None:
    """The same for the association's upper-layer (DUL) thread, where the state machine runs."""
    if self.assoc.ae not in _guarded:
        _original_dul_reactor(self)
        return
    try:
        _original_dul_reactor(self)
    except Exception as exc:  # noqa: BLE001 - as above
        peer = self.assoc.requestor.address
        log.warning("association from %s ended abnormally: %s: %s", peer, type(exc).__name__, exc)
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        sock = getattr(self.socket, "socket", None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def install(ae: Any) -> None:
    """Guard the association and upper-layer threads of `ae` (idempotent)."""
    with _install_lock:
        Association.run_reactor = _guarded_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _guarded_dul_reactor  # type: ignore[method-assign]
        _guarded.add(ae)
