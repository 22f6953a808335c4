"""Patient-level splits on the real records: no leakage, reproducible, stratified, on disk."""

from __future__ import annotations

import os
from collections import Counter

from training.readers import read_folder_per_class
from training.splits import (
    apply_split,
    file_sha256,
    leaked_patients,
    patient_split,
    read_split,
    write_split,
)


def test_no_patient_in_two_splits(shared_records):
    recs = apply_split(shared_records, patient_split(shared_records, seed=3))
    assert leaked_patients(recs) == set()
    # Kermany has many multi-image patients: an image-level split would have leaked some
    assert Counter(r.patient_id for r in recs if r.source == "kermany").most_common(1)[0][1] > 1


def test_split_is_seeded_and_reproducible(shared_records):
    a = patient_split(shared_records, seed=5)
    b = patient_split(list(reversed(shared_records)), seed=5)
    c = patient_split(shared_records, seed=6)
    assert a == b
    assert a != c


def test_split_is_stratified_by_source_and_finding(shared_records):
    recs = apply_split(shared_records, patient_split(shared_records, fractions=(0.7, 0.15, 0.15), seed=1))
    for split in ("train", "val", "test"):
        part = [r for r in recs if r.given_split == split]
        for finding in ("pneumonia", "mass", "covid19"):
            assert any(r.label(finding) == 1 for r in part), (split, finding)
            assert any(r.label(finding) == 0 for r in part), (split, finding)
    by = Counter((r.source, r.given_split) for r in recs)
    for source in ("kermany", "nih", "covid-hannover"):
        total = sum(v for (s, _), v in by.items() if s == source)
        assert 0.6 < by[(source, "train")] / total < 0.8


def test_split_written_and_read_back(shared_records, tmp_path):
    recs = apply_split(shared_records, patient_split(shared_records, seed=2))
    sha1 = write_split(recs, tmp_path / "a.csv")
    sha2 = write_split(list(reversed(recs)), tmp_path / "b.csv")
    assert sha1 == sha2 == file_sha256(tmp_path / "a.csv")  # content-addressed: order does not matter
    back = read_split(tmp_path / "a.csv")
    assert sorted((str(r.path.resolve()), r.given_split, r.labels) for r in back) == sorted(
        (str(r.path.resolve()), r.given_split, r.labels) for r in recs
    )
    # paths are stored relative to the checkout, so a committed split names the same images elsewhere
    rows = (tmp_path / "a.csv").read_text().splitlines()[1:]
    assert not any(row.startswith("/") for row in rows)


def test_train_val_test_folder_layout_is_honoured(shared_records, tmp_path):
    """The layout of earlier projects: root/{train,val,test}/{NORMAL,PNEUMONIA} with real images."""
    kermany = [r for r in shared_records if r.source == "kermany"]
    chosen = {
        "train": kermany[:6] + kermany[-6:],
        "val": kermany[10:13] + kermany[-13:-10],
        "test": kermany[20:22] + kermany[-22:-20],
    }
    for split, rs in chosen.items():
        for r in rs:
            dst = tmp_path / split / r.raw_label / r.path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(r.path, dst)
    recs = read_folder_per_class(tmp_path, source="kermany-layout")
    assert Counter(r.given_split for r in recs) == {"train": 12, "val": 6, "test": 4}
    assignment = patient_split(recs, seed=0, honour_given=True)
    assert all(assignment[r.patient_id] == r.given_split for r in recs)


def test_per_source_fractions_give_small_collections_larger_holdouts(shared_records):
    """NIH gets 30 % val and 30 % test (its within-collection sets are small), the rest 15 %."""
    nih = (0.4, 0.3, 0.3)
    recs = apply_split(shared_records, patient_split(shared_records, seed=1, fractions_by_source={"nih": nih}))
    by = Counter((r.source, r.given_split) for r in recs)
    total = sum(v for (s, _), v in by.items() if s == "nih")
    assert 0.35 < by[("nih", "train")] / total < 0.45
    assert 0.25 < by[("nih", "test")] / total < 0.35
    kermany = sum(v for (s, _), v in by.items() if s == "kermany")
    assert 0.6 < by[("kermany", "train")] / kermany < 0.8
    nf_test = [r for r in recs if r.source == "nih" and r.raw_label == "No Finding" and r.given_split == "test"]
    assert 25 <= len(nf_test) <= 35
    assert leaked_patients(recs) == set()
