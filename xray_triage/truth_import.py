"""`xray-triage truth import FILE.csv`: reference labels for a retrospective check, all or nothing.

Columns (header row, any order): ``study_uid`` or ``accession`` (one of them per row),
``finding`` (pneumonia, mass, covid19) and ``present`` (yes/no, 1/0, true/false,
present/absent, or uncertain).  Every row is checked before anything is written; a file with
any bad row writes nothing and each bad row is reported by its line number, without echoing
identifiers (they are patient data).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Study, TruthLabel, utcnow
from db.truth import set_truth
from models.findings import FINDING_NAMES
from worklist import audit

_LABELS = {
    **dict.fromkeys(("yes", "y", "1", "true", "present", "positive"), TruthLabel.PRESENT),
    **dict.fromkeys(("no", "n", "0", "false", "absent", "negative"), TruthLabel.ABSENT),
    **dict.fromkeys(("uncertain", "?", "unknown", "equivocal"), TruthLabel.UNCERTAIN),
}


class TruthImportError(ValueError):
    """The file cannot be imported; ``problems`` lists every bad row."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s); nothing imported")
        self.problems = problems


@dataclass(frozen=True)
class TruthRow:
    line: int
    study_id: int
    study_uid: str
    finding: str
    label: TruthLabel


def _study(session: Session, uid: str, accession: str) -> tuple[Study | None, str | None]:
    if uid:
        found = session.scalar(select(Study).where(Study.study_uid == uid))
        return (found, None) if found is not None else (None, "no study with this Study Instance UID")
    matches = list(session.scalars(select(Study).where(Study.accession_number == accession).limit(2)))
    if not matches:
        return None, "no study with this accession number"
    if len(matches) > 1:
        return None, "this accession number belongs to several studies: use study_uid"
    return matches[0], None


def read_rows(session: Session, path: Path) -> list[TruthRow]:
    """Every row, checked; raises TruthImportError listing all problems."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TruthImportError([f"{path.name}: cannot be read as UTF-8 text ({type(exc).__name__})"]) from None
    reader = csv.DictReader(text.splitlines())
    columns = {c.strip().lower() for c in reader.fieldnames or []}
    missing = {"finding", "present"} - columns
    if missing or not columns & {"study_uid", "accession"}:
        need = sorted(missing) + ([] if columns & {"study_uid", "accession"} else ["study_uid or accession"])
        raise TruthImportError([f"header: missing column(s) {', '.join(need)}"])
    rows: list[TruthRow] = []
    problems: list[str] = []
    seen: dict[tuple[int, str], int] = {}
    for n, raw in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        uid, accession = row.get("study_uid", ""), row.get("accession", "")
        finding, value = row.get("finding", "").lower(), row.get("present", "").lower()
        errors = []
        if not uid and not accession:
            errors.append("neither study_uid nor accession given")
        if finding not in FINDING_NAMES:
            errors.append(f"unknown finding (choose from {', '.join(FINDING_NAMES)})")
        if value not in _LABELS:
            errors.append("present must be yes/no, 1/0, true/false, present/absent or uncertain")
        study = None
        if uid or accession:
            study, why = _study(session, uid, accession)
            if why:
                errors.append(why)
        if study is not None and not errors:
            key = (study.id, finding)
            if key in seen:
                errors.append(f"repeats line {seen[key]} for the same study and finding")
            seen[key] = n
        if errors:
            problems.append(f"line {n}: " + "; ".join(errors))
        elif study is not None:
            rows.append(TruthRow(n, study.id, study.study_uid, finding, _LABELS[value]))
    if problems:
        raise TruthImportError(problems)
    if not rows:
        raise TruthImportError([f"{path.name}: no rows"])
    return rows


def import_truth(session: Session, path: Path, by: str) -> list[TruthRow]:
    """Check then write every row in the caller's transaction (audited); TruthImportError writes nothing."""
    rows = read_rows(session, path)
    now = utcnow()
    for r in rows:
        before, after = set_truth(session, r.study_id, r.finding, r.label, "import", by, now)
        if before != after:
            audit.record(
                session, by, "truth", now, r.study_uid, f"{r.finding}: {before or '-'} -> {after} (import {path.name})"
            )
    return rows
