"""`make fuzz`: a long network fuzzing campaign against a listener started here (embedded SQLite).

Prints the figures docs/conformance.md quotes: cases, replies, crashes (logged tracebacks and
thread deaths), success for bad data and peak RSS growth; exits 1 if any goal is missed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from db.session import upgrade
from settings import Settings
from tests.conftest import free_port
from tests.plugins import netfuzz
from xray_triage.services import start_intake


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xt-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        url = f"sqlite:///{tmp / 'xray-triage.db'}"
        upgrade(url)
        settings = Settings.model_validate(
            {
                "listener": {"port": free_port(), "network_timeout_s": 5.0},
                "storage": {"spool_dir": str(tmp / "spool"), "min_free_mb": 64},
                "database": {"url": url},
                "broker": {"url": f"sqla+sqlite:///{tmp / 'broker.db'}"},
            }
        )
        # pydicom warns (and logs) on every invalid value the fuzzer invents; the log file keeps them.
        warnings.filterwarnings("ignore", category=UserWarning)
        logging.basicConfig(level=logging.WARNING, filename=str(tmp / "listener.log"))
        tracebacks = netfuzz.TracebackCounter()
        logging.getLogger().addHandler(tracebacks)
        thread_errors: list[str] = []
        threading.excepthook = lambda a: thread_errors.append(f"{a.exc_type.__name__}: {a.exc_value}")
        handle = start_intake(settings, with_handoff=False)
        started = time.monotonic()

        def progress(c: netfuzz.Campaign) -> None:
            if c.cases % 1000 == 0:
                print(f"{c.cases} cases, {time.monotonic() - started:.0f} s", flush=True)

        try:
            campaign = netfuzz.fuzz(
                handle.port, url, tmp / "spool", cases=args.cases, seed=args.seed, progress=progress
            )
        finally:
            handle.stop()
        print(campaign.summary())
        print(f"crashes (logged tracebacks + thread deaths): {tracebacks.count + len(thread_errors)}")
        print(f"seed {args.seed}, {time.monotonic() - started:.0f} s")
        for line in [
            *campaign.bad_successes[:10],
            *campaign.invariant_failures[:10],
            *tracebacks.first,
            *thread_errors[:5],
        ]:
            print("  " + line)
        failed = campaign.bad_successes or campaign.invariant_failures or tracebacks.count or thread_errors
        return 1 if failed or campaign.peak_rss_growth > 256 * netfuzz.MIB else 0


if __name__ == "__main__":
    sys.exit(main())
