"""Start-up agreement of spool and database: every stored file has its row, every row its file.

A C-STORE is answered only after the file is on disk *and* its row is committed, so a crash
between the two (kill -9, power loss) leaves a file under its final name that no row points
to: an instance nobody was told was stored.  Such files are moved to a quarantine folder
(``<spool>/.quarantine/<UTC time>/...``, same filesystem, nothing deleted) and logged, so IT
staff can look at them and the spool again holds exactly what the database says.  Rows whose
file is missing cannot be repaired here; they are counted and logged by relative path.

Runs before the listener accepts associations; like the staging sweep, it assumes one
listener per spool folder (two listeners writing one spool would see each other's in-flight
files as orphans).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance

log = logging.getLogger("xray_triage.listener")

QUARANTINE_DIRNAME = ".quarantine"


@dataclass
class Reconciliation:
    """What start-up found: files moved aside (relative paths as they were), rows without a file."""

    quarantined: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    quarantine_dir: Path | None = None


def spooled_paths(root: Path) -> set[str]:
    """Relative paths of the instance files under the spool (``study/series/sop.hash.dcm``)."""
    return {
        p.relative_to(root).as_posix()
        for p in root.glob("*/*/*.dcm")
        if not p.relative_to(root).parts[0].startswith(".") and p.is_file()
    }


def recorded_paths(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(Instance.spool_path).distinct()))


def compare(on_disk: Iterable[str], in_database: Iterable[str]) -> tuple[list[str], list[str]]:
    """(files without a row, rows without a file), each sorted."""
    disk, db = set(on_disk), set(in_database)
    return sorted(disk - db), sorted(db - disk)


def _move_aside(root: Path, relative: str, quarantine: Path) -> None:
    target = quarantine / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(root / relative, target)  # same filesystem: atomic, the bytes are never copied
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reconcile(root: Path, factory: sessionmaker[Session], now: datetime | None = None) -> Reconciliation:
    """Quarantine files no row points to; report rows whose file is gone.  Logs both."""
    root = Path(root)
    try:
        recorded = recorded_paths(factory)
    except SQLAlchemyError as exc:
        # The listener runs while the database is away (pushes get 0xC001); nothing is moved
        # without knowing what is recorded.  The next start reconciles.
        log.warning("spool reconciliation skipped: database unavailable (%s)", type(exc).__name__)
        return Reconciliation()
    orphans, missing = compare(spooled_paths(root), recorded)
    result = Reconciliation(missing=missing)
    if orphans:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        result.quarantine_dir = root / QUARANTINE_DIRNAME / stamp
        for relative in orphans:
            try:
                _move_aside(root, relative, result.quarantine_dir)
            except OSError as exc:
                log.error("could not quarantine unrecorded spool file %s: %s", relative, type(exc).__name__)
                continue
            result.quarantined.append(relative)
        log.warning(
            "moved %d spool file(s) without a database row (left by an earlier crash, never acknowledged) to %s",
            len(result.quarantined),
            result.quarantine_dir,
        )
        for relative in result.quarantined:
            log.warning("quarantined unrecorded spool file %s", relative)
    if missing:
        log.error("%d recorded instance(s) have no file in the spool; first: %s", len(missing), missing[0])
    return result
