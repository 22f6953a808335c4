"""Hostile peers against the real listener: declared lengths and junk connections.

A P-DATA-TF header declaring 0xFFFFFFFF bytes followed by 16 bytes once made the listener
allocate 4 GiB at once.  Now a PDU longer than ``listener.max_pdu`` (what the listener told
the peer it accepts) ends that association without reading or allocating the declared
length, and the listener keeps serving real senders.  Memory is measured as this process's
peak RSS (the listener runs in the test process), reset through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from pynetdicom import AE

from dicom_io.listener import open_associations
from tests.plugins.ingest import AE_TITLE, echoscu, real_files, storescu, wait_for

VERIFICATION = "1.2.840.10008.1.1"
MIB = 1024 * 1024


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _associated(port: int):
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize(
    "declared, sent",
    [
        pytest.param(0xFFFFFFFF, 16, id="4GiB-declared-16-bytes-sent"),
        pytest.param(262144 + 1, 262144 + 1, id="one-byte-over-max-pdu-all-sent"),
    ],
)
def test_pdu_longer_than_max_pdu_ends_the_association_without_allocating_it(
    sqlite_backend, tmp_path, start_listener, log_text, declared, sent
):
    settings = sqlite_backend.settings(tmp_path)  # listener.max_pdu 262144
    handle = start_listener(settings, with_handoff=False)
    assoc = _associated(handle.port)
    raw = assoc.dul.socket.socket
    _peak_rss_reset()
    before = _peak_rss()
    # P-DATA-TF (type 0x04): type, reserved, 4-byte length, then the body bytes the attacker sends.
    body = b"\x00\x00\x00\x0c\x01\x03" + b"\x00" * (sent - 6)
    raw.sendall(struct.pack(">BBL", 0x04, 0, declared) + body[:sent])
    wait_for(lambda: not assoc.is_established, timeout=30, what="the listener to end the association")
    grown = _peak_rss() - before
    assert grown <= 256 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB"
    assert f"declares {declared} bytes; at most 262144 accepted" in log_text()
    assoc.abort()
    # The listener keeps serving: an echo and a real store succeed.
    assert echoscu(handle.port).returncode == 0
    result = storescu(handle.port, [real_files()[0]])
    assert result.returncode == 0, result.stderr[-2000:]


def test_pdus_up_to_max_pdu_and_many_of_them_still_store(sqlite_backend, tmp_path, start_listener):
    """The bound is max_pdu itself: a large image sent in full-size PDUs is stored as before."""
    settings = sqlite_backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    big = max(real_files(), key=lambda p: p.stat().st_size)
    assert big.stat().st_size > 262144 * 2  # spans several full PDUs
    result = storescu(handle.port, [big])  # DCMTK sends PDUs up to the max_pdu we negotiate
    assert result.returncode == 0, result.stderr[-2000:]


def _garbage_connection(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"\0" * 50)


def test_garbage_connections_do_not_hold_the_slots_real_senders_need(
    sqlite_backend, tmp_path, start_listener, log_text
):
    """Connections that send junk and close used to count as active for the 30 s ACSE timeout."""
    settings = sqlite_backend.settings(tmp_path, listener={"max_associations": 2})
    handle = start_listener(settings, with_handoff=False)
    for _ in range(12):
        _garbage_connection(handle.port)
    wait_for(lambda: open_associations(handle.listener.ae) == 0, timeout=10, what="junk connections to end")
    echo = echoscu(handle.port)
    assert echo.returncode == 0, echo.stderr[-2000:]
    result = storescu(handle.port, [real_files()[0]])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rejected" not in log_text()


def test_max_associations_still_limits_open_associations(sqlite_backend, tmp_path, start_listener, log_text):
    settings = sqlite_backend.settings(tmp_path, listener={"max_associations": 2})
    handle = start_listener(settings, with_handoff=False)
    held = [_associated(handle.port) for _ in range(2)]
    refused = echoscu(handle.port)
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    assert "Local Limit Exceeded" in refused.stderr or "local-limit-exceeded" in refused.stderr.lower()
    assert "rejected: 2 open associations" in log_text()
    for assoc in held:
        assoc.release()
    wait_for(lambda: open_associations(handle.listener.ae) == 0, timeout=10, what="the released associations to end")
    assert echoscu(handle.port).returncode == 0
