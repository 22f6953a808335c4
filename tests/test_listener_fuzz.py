"""A bounded network fuzz run against the real listener, every time the suite runs.

A few hundred seeded cases (mutated real datasets, deflated streams and bombs, hostile command
sets, lying PDUs, mutated A-ASSOCIATE-RQs; see tests/plugins/netfuzz.py), with the invariants
checked after every batch of 50.  ``make fuzz`` runs the same engine for tens of thousands of
cases; its figures are in docs/conformance.md.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from tests.plugins import netfuzz

CASES = 300
SEED = int(os.environ.get("XT_FUZZ_SEED", "20261205"))


def test_fuzzed_peers_never_get_success_for_bad_data_and_the_listener_stays_sound(
    sqlite_backend, tmp_path, start_listener
):
    settings = sqlite_backend.settings(tmp_path, listener={"network_timeout_s": 5.0})
    handle = start_listener(settings, with_handoff=False)
    tracebacks = netfuzz.TracebackCounter()
    logging.getLogger().addHandler(tracebacks)
    thread_errors: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: thread_errors.append(f"{args.exc_type.__name__}: {args.exc_value}")
    try:
        campaign = netfuzz.fuzz(
            handle.port, settings.database.url, Path(settings.storage.spool_dir), cases=CASES, seed=SEED
        )
    finally:
        threading.excepthook = previous_hook
        logging.getLogger().removeHandler(tracebacks)
    print(campaign.summary())
    assert campaign.cases == CASES
    assert campaign.bad_successes == [], campaign.summary()
    assert campaign.invariant_failures == [], campaign.summary()
    assert tracebacks.count == 0, tracebacks.first
    assert thread_errors == []
    assert campaign.peak_rss_growth <= 256 * netfuzz.MIB, campaign.summary()
    # The run exercised every family and got both successes and refusals.
    assert set(campaign.families) == {"dataset", "deflated", "command", "pdu", "association"}
    assert campaign.replies["status:0x0000"] > 0 and campaign.replies["status:0xC210"] > 0
