"""Patient-level, stratified, seeded splits that are written to disk.

A patient's images all land in one split, otherwise validation measures memory of a patient
rather than generalization.  Patients are stratified by (source, label pattern) so that every
split sees every collection and every finding in the same proportion; the assignment is a pure
function of the seed and the record list, and it is saved as CSV so an evaluation can name
exactly what it was computed on (the file's SHA-256 goes into the model card).
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from models.findings import FINDING_NAMES
from training.readers import Record

SPLITS = ("train", "val", "test")
REPO = Path(__file__).resolve().parents[1]
SPLIT_COLUMNS = ("path", "split", "source", "patient_id", "population", "raw_label", "view", *FINDING_NAMES)


def _patient_stratum(records: Sequence[Record]) -> str:
    """A patient's stratum: its source and the max label per finding over its images."""
    labels = [max(r.labels[i] for r in records) for i in range(len(FINDING_NAMES))]
    return records[0].source + ":" + ",".join(str(v) for v in labels)


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder counts per split; small strata still give val/test a patient when n >= 3."""
    raw = [n * f for f in fractions]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(fractions):
        for i in range(1, len(fractions)):
            if counts[i] == 0 and fractions[i] > 0:
                counts[i] += 1
                counts[0] -= 1
    return counts


def patient_split(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 20260401,
    honour_given: bool = False,
    fractions_by_source: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, str]:
    """Map patient_id -> split name.

    ``honour_given`` keeps a dataset's own train/val/test folders when it has them (the layout of
    earlier projects) instead of re-splitting; patients are still never split across folders.
    ``fractions_by_source`` overrides the fractions for some sources: the within-collection
    comparisons (NIH pneumonia or mass vs NIH "No Finding") have about a hundred images per
    class in all, and a 15 % test share of them could not measure an AUC.
    """
    by_source = {k: tuple(v) for k, v in (fractions_by_source or {}).items()}
    for f in (fractions, *by_source.values()):
        if len(f) != len(SPLITS) or abs(sum(f) - 1.0) > 1e-6:
            raise ValueError("fractions must be three numbers (train, val, test) summing to 1")
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    assignment: dict[str, str] = {}
    strata: dict[str, list[str]] = defaultdict(list)
    for pid, recs in by_patient.items():
        given = {r.given_split for r in recs if r.given_split}
        if honour_given and len(given) == 1:
            assignment[pid] = given.pop()
        else:
            strata[_patient_stratum(recs)].append(pid)
    rng = random.Random(seed)
    for key in sorted(strata):
        pids = sorted(strata[key])
        rng.shuffle(pids)
        source = key.split(":", 1)[0]
        counts = _allocate(len(pids), by_source.get(source, fractions))
        start = 0
        for name, c in zip(SPLITS, counts, strict=True):
            for pid in pids[start : start + c]:
                assignment[pid] = name
            start += c
    return assignment


def apply_split(records: Sequence[Record], assignment: dict[str, str]) -> list[Record]:
    """Records with ``given_split`` replaced by the assigned split (what the CSV stores)."""
    return [replace(r, given_split=assignment[r.patient_id]) for r in records]


def _portable(path: Path) -> str:
    """Image paths relative to the repository root (``../shared/data/...``), so a committed
    split file names the same images on any checkout that has the data beside it."""
    try:
        return os.path.relpath(os.path.normpath(path), REPO)
    except ValueError:  # another drive (Windows): keep it absolute
        return str(path)


def write_split(records: Sequence[Record], path: str | Path) -> str:
    """Write the split CSV (sorted, so the bytes depend only on the content); return its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(records, key=lambda r: (r.given_split, r.source, str(r.path)))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(SPLIT_COLUMNS)
        for r in rows:
            w.writerow(
                [_portable(r.path), r.given_split, r.source, r.patient_id, r.population, r.raw_label, r.view, *r.labels]
            )
    return file_sha256(path)


def read_split(path: str | Path) -> list[Record]:
    """Records back from a split CSV; ``given_split`` holds the split."""
    out: list[Record] = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.append(
                Record(
                    path=_resolve(row["path"]),
                    source=row["source"],
                    patient_id=row["patient_id"],
                    labels=tuple(int(row[n]) for n in FINDING_NAMES),
                    population=row["population"],
                    raw_label=row["raw_label"],
                    view=row["view"],
                    given_split=row["split"],
                )
            )
    return out


def _resolve(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO / path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def leaked_patients(records: Sequence[Record]) -> set[str]:
    """Patients found in more than one split: must be empty."""
    seen: dict[str, set[str]] = defaultdict(set)
    for r in records:
        seen[r.patient_id].add(r.given_split)
    return {pid for pid, s in seen.items() if len(s) > 1}
