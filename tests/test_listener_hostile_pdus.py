"""Hostile PDUs against the real listener: a declared length is never trusted with memory.

A P-DATA-TF header declaring 0xFFFFFFFF bytes followed by 16 bytes once made the listener
allocate 4 GiB at once.  Now a PDU longer than ``listener.max_pdu`` (what the listener told
the peer it accepts) ends that association without reading or allocating the declared
length, and the listener keeps serving real senders.  Memory is measured as this process's
peak RSS (the listener runs in the test process), reset through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pynetdicom import AE

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
