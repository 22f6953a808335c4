"""Start-up reconciliation of spool and database against the real listener.

A crash between "file linked under its final name" and "row committed" leaves a file no row
points to (the C-STORE was never answered).  On the next start the listener moves it to the
quarantine folder and logs it; recorded files stay, rows whose file is gone are logged.
"""

from __future__ import annotations

import shutil

from sqlalchemy import select

from db.models import Instance
from db.session import make_engine, make_sessionmaker
from dicom_io.reconcile import QUARANTINE_DIRNAME, compare
from tests.plugins.ingest import real_files, storescu


def _recorded(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            return sorted(s.scalars(select(Instance.spool_path)))
    finally:
        engine.dispose()


def test_compare_names_both_directions() -> None:
    assert compare(["a/b/1.x.dcm", "a/b/2.x.dcm"], ["a/b/2.x.dcm", "a/b/3.x.dcm"]) == (["a/b/1.x.dcm"], ["a/b/3.x.dcm"])


def test_restart_quarantines_unrecorded_files_and_reports_missing_ones(
    sqlite_backend, tmp_path, start_listener, log_text
) -> None:
    settings = sqlite_backend.settings(tmp_path)
    spool = tmp_path / "spool"
    first = start_listener(settings, with_handoff=False)
    files = real_files()[:2]
    for f in files:
        assert storescu(first.port, [f]).returncode == 0
    first.stop()
    kept, lost = _recorded(sqlite_backend.database_url)[:2]
    # The crash window: a complete file under a final name, no row (the sender never got 0x0000).
    orphan = "1.2.826.0.1.3680043.10.1/1.2.826.0.1.3680043.10.2/1.2.826.0.1.3680043.10.3.0123456789abcdef.dcm"
    (spool / orphan).parent.mkdir(parents=True)
    shutil.copyfile(files[0], spool / orphan)
    # And a recorded file that disappeared (a disk problem, an operator).
    (spool / lost).unlink()

    second = start_listener(settings, with_handoff=False)
    quarantined = list((spool / QUARANTINE_DIRNAME).glob(f"*/{orphan}"))
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == files[0].read_bytes()  # moved, not deleted
    assert not (spool / orphan).exists()
    assert (spool / kept).is_file()  # recorded files stay where they are
    logs = log_text()
    assert "moved 1 spool file(s) without a database row" in logs and orphan in logs
    assert f"1 recorded instance(s) have no file in the spool; first: {lost}" in logs
    # The listener serves as usual, and a third start finds nothing more to move.
    assert storescu(second.port, [files[1]]).returncode == 0
    second.stop()
    start_listener(settings, with_handoff=False)
    assert len(list((spool / QUARANTINE_DIRNAME).rglob("*.dcm"))) == 1


def test_database_away_at_start_moves_nothing(tmp_path, log_text) -> None:
    """The listener starts while the database is away; reconciliation waits for a start that can see it."""
    from dicom_io.reconcile import reconcile

    orphan = tmp_path / "spool" / "1.2" / "1.3" / "1.4.0123456789abcdef.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"DICM")
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    try:
        result = reconcile(tmp_path / "spool", make_sessionmaker(engine))
    finally:
        engine.dispose()
    assert result.quarantined == [] and orphan.is_file()
    assert "spool reconciliation skipped: database unavailable (OperationalError)" in log_text()
