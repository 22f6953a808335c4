"""Readers that turn each public dataset layout into one list of labelled records.

A record names the file, the patient (so splits can be made by patient, never by image), the
population (paediatric/adult, so batches can mix both and reports can break metrics down) and
the label vector from ``models.findings``.  Pixels are not read here: every image goes through
``dicom_io.pixels.to_model_tensor`` later, the same function the worker uses.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.findings import (
    FINDING_NAMES,
    covid_collection_labels,
    ieee8023_noncovid_labels,
    kermany_labels,
    label_vector,
    nih_labels,
    rsna_normal_labels,
)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})
SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image with its patient and labels (labels in ``FINDING_NAMES`` order, -1 = unlabelled)."""

    path: Path
    source: str
    patient_id: str
    labels: tuple[int, ...]
    population: str  # "paediatric" | "adult" | "unknown"
    raw_label: str = ""
    view: str = ""
    # The split a dataset's own layout prescribes (train/val/test folders); "" when none.
    given_split: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_labelled(self) -> bool:
        """A record with no label at all cannot train or evaluate anything."""
        return any(v >= 0 for v in self.labels)

    def label(self, finding: str) -> int:
        return self.labels[FINDING_NAMES.index(finding)]


_KERMANY_PATIENT = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^(NORMAL\d*-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)


def kermany_patient_id(filename: str) -> str:
    """Patient ID from a Kermany file name (``person12_virus_40``, ``IM-0115-0001``, ``NORMAL2-IM-0629-0001``).

    Several images share a patient; an image-level split would leak the patient into validation.
    """
    for rx in _KERMANY_PATIENT:
        m = rx.match(filename)
        if m:
            return m.group(1)
    return Path(filename).stem  # unknown pattern: treat the image as its own patient


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder_per_class(
    root: str | Path,
    source: str = "kermany",
    population: str = "paediatric",
) -> list[Record]:
    """Folder-per-class layouts: ``root/CLASS/*`` or ``root/{train,val,test}/CLASS/*``.

    Class folders are mapped with the Kermany mapping (NORMAL/PNEUMONIA), which is what every
    earlier project in this layout used; a given train/val/test folder is kept in ``given_split``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    split_dirs = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    layouts = [(d, d.name) for d in split_dirs] if split_dirs else [(root, "")]
    records: list[Record] = []
    for base, given in layouts:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            labels = kermany_labels(class_dir.name)
            for img in _images(class_dir):
                records.append(
                    Record(
                        path=img,
                        source=source,
                        patient_id=f"{source}:{kermany_patient_id(img.name)}",
                        labels=labels,
                        population=population,
                        raw_label=class_dir.name.upper(),
                        given_split=given,
                    )
                )
    return records


def _listed_images(csv_path: Path, image_dir: Path, column: str) -> Iterator[tuple[dict[str, str], Path]]:
    """(row, image path) for every row of a labels CSV; a listed image that is missing is an
    error, not a silent gap in the counts the README states."""
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = image_dir / row[column].strip()
            if not path.exists():
                raise FileNotFoundError(f"{csv_path}: listed image missing: {path}")
            yield row, path


def _population(age: str) -> str:
    """Adult unless a numeric age in years says under 18 (a missing age is an adult film here)."""
    return "paediatric" if age.isdigit() and int(age) < 18 else "adult"


def read_nih_csv(root: str | Path, source: str = "nih") -> list[Record]:
    """NIH ChestX-ray14 style: ``root/labels.csv`` (Image Index, Finding Labels, Patient ID, ...) + ``root/images``."""
    root = Path(root)
    csv_path = root / "labels.csv"
    image_dir = root / "images"
    records: list[Record] = []
    for row, path in _listed_images(csv_path, image_dir, "Image Index"):
        age = row.get("Patient Age", "").strip()
        records.append(
            Record(
                path=path,
                source=source,
                patient_id=f"{source}:{row['Patient ID'].strip()}",
                labels=nih_labels(row["Finding Labels"]),
                population=_population(age),
                raw_label=row["Finding Labels"].strip(),
                view=row.get("View Position", "").strip().upper(),
                extra={"age": age, "sex": row.get("Patient Gender", "").strip()},
            )
        )
    return records


def read_covid_metadata(root: str | Path, source: str | None = None) -> list[Record]:
    """COVID-Net collections (Actualmed, Figure1): ``root/metadata.csv`` + ``root/images``.

    Rows whose image is absent are skipped (the published metadata lists a few never released).
    """
    root = Path(root)
    source = source or f"covid-{root.name}"
    records: list[Record] = []
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = root / "images" / row["imagename"].strip()
            if not path.exists():
                continue
            records.append(
                Record(
                    path=path,
                    source=source,
                    patient_id=f"{source}:{row['patientid'].strip() or path.stem}",
                    labels=covid_collection_labels(row.get("finding", "")),
                    population="adult",
                    raw_label=row.get("finding", "").strip(),
                    view=row.get("view", "").strip().upper(),
                )
            )
    return records


def read_labels_csv(root: str | Path, source: str | None = None) -> list[Record]:
    """Hannover layout: ``root/labels.csv`` (filename, label, patient_id, projection) + ``root/images``."""
    root = Path(root)
    source = source or f"covid-{root.name}"
    records: list[Record] = []
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = root / "images" / row["filename"].strip()
            records.append(
                Record(
                    path=path,
                    source=source,
                    patient_id=f"{source}:{row['patient_id'].strip()}",
                    labels=covid_collection_labels(row["label"]),
                    population="adult",
                    raw_label=row["label"].strip(),
                    view=row.get("projection", "").strip().upper(),
                )
            )
    return records


def read_rsna_normals(root: str | Path, source: str = "rsna-normals") -> list[Record]:
    """RSNA adult normals: ``root/labels.csv`` (file, finding, source_file) + ``root/images``.

    RSNA kept about one image per patient and publishes no patient IDs, so each image is its
    own patient.
    """
    root = Path(root)
    return [
        Record(
            path=path,
            source=source,
            patient_id=f"{source}:{path.stem}",
            labels=rsna_normal_labels(row["finding"]),
            population="adult",
            raw_label=row["finding"].strip(),
        )
        for row, path in _listed_images(root / "labels.csv", root, "file")
    ]


def read_ieee8023(root: str | Path, source: str = "ieee8023-noncovid") -> list[Record]:
    """ieee8023 case-report collection: ``root/metadata.csv`` (file, patientid, age, finding, view, ...)."""
    root = Path(root)
    records: list[Record] = []
    for row, path in _listed_images(root / "metadata.csv", root, "file"):
        age = row.get("age", "").strip()
        records.append(
            Record(
                path=path,
                source=source,
                patient_id=f"{source}:{row['patientid'].strip() or path.stem}",
                labels=ieee8023_noncovid_labels(row.get("finding", "")),
                population=_population(age),
                raw_label=row.get("finding", "").strip(),
                view=row.get("view", "").strip().upper(),
                extra={"age": age, "sex": row.get("sex", "").strip(), "license": row.get("license", "").strip()},
            )
        )
    return records


READERS = {
    "folder_per_class": read_folder_per_class,
    "nih_csv": read_nih_csv,
    "covid_metadata": read_covid_metadata,
    "labels_csv": read_labels_csv,
    "rsna_normals": read_rsna_normals,
    "ieee8023": read_ieee8023,
}


def read_dataset(kind: str, path: str | Path, **kwargs: str) -> list[Record]:
    """Dispatch on the ``kind`` a training config names, so configs stay declarative."""
    try:
        reader = READERS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {sorted(READERS)}") from None
    return reader(path, **kwargs)


def read_shared_data(root: str | Path) -> list[Record]:
    """Every labelled collection under ``../shared/data`` with its default reader."""
    root = Path(root)
    records = read_folder_per_class(root / "kermany", source="kermany", population="paediatric")
    records += read_nih_csv(root / "nih-findings", source="nih")
    records += read_covid_metadata(root / "covid" / "actualmed", source="covid-actualmed")
    records += read_covid_metadata(root / "covid" / "figure1", source="covid-figure1")
    records += read_labels_csv(root / "covid" / "hannover", source="covid-hannover")
    records += read_rsna_normals(root / "adult-normals-rsna", source="rsna-normals")
    records += read_ieee8023(root / "ieee8023-noncovid", source="ieee8023-noncovid")
    return records


def summarize(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    """Per source: images, patients and positives/negatives per finding (what the README states)."""
    out: dict[str, dict[str, int]] = {}
    patients: dict[str, set[str]] = {}
    for r in records:
        s = out.setdefault(r.source, {"images": 0})
        s["images"] += 1
        patients.setdefault(r.source, set()).add(r.patient_id)
        for name, v in zip(FINDING_NAMES, r.labels, strict=True):
            if v >= 0:
                key = f"{name}_{'pos' if v == 1 else 'neg'}"
                s[key] = s.get(key, 0) + 1
    for src, pats in patients.items():
        out[src]["patients"] = len(pats)
    return out


__all__ = [
    "READERS",
    "Record",
    "kermany_patient_id",
    "label_vector",
    "read_covid_metadata",
    "read_dataset",
    "read_folder_per_class",
    "read_ieee8023",
    "read_labels_csv",
    "read_nih_csv",
    "read_rsna_normals",
    "read_shared_data",
    "summarize",
]
