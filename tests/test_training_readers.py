"""Readers on the real shared data: counts must match ../shared/data/README.md."""

from __future__ import annotations

from collections import Counter

import pytest

from models.findings import (
    UNLABELLED,
    covid_collection_labels,
    ieee8023_noncovid_labels,
    kermany_labels,
    label_vector,
    nih_labels,
    rsna_normal_labels,
)
from tests.conftest import shared_file
from training.readers import (
    kermany_patient_id,
    read_covid_metadata,
    read_folder_per_class,
    read_ieee8023,
    read_labels_csv,
    read_nih_csv,
    read_rsna_normals,
    summarize,
)


def test_kermany_counts_and_patients():
    recs = read_folder_per_class(shared_file("kermany"), source="kermany")
    classes = Counter(r.raw_label for r in recs)
    assert classes == {"NORMAL": 1341, "PNEUMONIA": 3875}
    names = Counter("bacteria" if "_bacteria_" in r.path.name else "virus" for r in recs if r.raw_label == "PNEUMONIA")
    # README says 2772 bacterial / 1103 viral; the file names actually hold 2530 / 1345 (same total).
    # Nothing depends on the sub-type (both map to pneumonia=1), so the test pins what is on disk.
    assert names == {"bacteria": 2530, "virus": 1345}
    assert all(r.given_split == "train" for r in recs)  # the official train folder
    assert all(r.population == "paediatric" for r in recs)
    # several images share a patient, which is why splits are by patient
    per_patient = Counter(r.patient_id for r in recs)
    assert len(per_patient) < len(recs)
    assert max(per_patient.values()) > 1


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0629-0001-0002.jpeg", "IM-0629"),
        ("NORMAL2-IM-0629-0001.jpeg", "NORMAL2-IM-0629"),
    ],
)
def test_kermany_patient_ids(name, patient):
    assert kermany_patient_id(name) == patient


def test_nih_counts_and_mapping():
    recs = read_nih_csv(shared_file("nih-findings"))
    assert len(recs) == 599
    assert len({r.patient_id for r in recs}) == 599  # one image per patient
    raw = Counter(label for r in recs for label in r.raw_label.split("|"))
    assert raw["Mass"] == 68 and raw["Nodule"] == 86 and raw["Pneumonia"] == 16
    assert raw["Consolidation"] == 80 and raw["No Finding"] == 100
    mass_pos = sum(r.label("mass") == 1 for r in recs)
    assert mass_pos == sum(1 for r in recs if {"Mass", "Nodule"} & set(r.raw_label.split("|")))
    assert all(r.label("covid19") == 0 for r in recs)  # 2017 data


def test_covid_collections_counts():
    am = read_covid_metadata(shared_file("covid", "actualmed"))
    f1 = read_covid_metadata(shared_file("covid", "figure1"))
    hn = read_labels_csv(shared_file("covid", "hannover"))
    assert Counter(r.raw_label for r in am) == {"COVID-19": 26, "No finding": 18, "": 10}
    assert Counter(r.raw_label for r in f1) == {"COVID-19": 35, "Pneumonia": 2, "No finding": 3, "": 15}
    assert len(hn) == 243 and len({r.patient_id for r in hn}) == 71
    assert all(r.label("covid19") == 1 and r.label("pneumonia") == 1 for r in hn)
    blank = [r for r in am + f1 if not r.raw_label]
    assert blank and all(not r.is_labelled for r in blank)  # blank is unknown, never negative


def test_summary_of_all_shared_data(shared_records):
    s = summarize(shared_records)
    assert s["kermany"]["images"] == 5216 and s["nih"]["images"] == 599
    assert s["covid-hannover"]["patients"] == 71
    assert s["rsna-normals"]["images"] == 6000 and s["ieee8023-noncovid"]["images"] == 82
    assert sum(v["images"] for v in s.values()) == 5216 + 599 + 54 + 55 + 243 + 6000 + 82


def test_rsna_normals_counts_and_labels():
    recs = read_rsna_normals(shared_file("adult-normals-rsna"))
    assert len(recs) == 6000
    assert all(r.labels == label_vector(pneumonia=0, mass=0, covid19=0) for r in recs)
    assert all(r.population == "adult" and r.path.suffix == ".jpg" and r.path.exists() for r in recs)
    # no patient IDs are published: every image is its own patient
    assert len({r.patient_id for r in recs}) == 6000
    assert {r.source for r in recs} == {"rsna-normals"}


def test_ieee8023_counts_and_labels():
    recs = read_ieee8023(shared_file("ieee8023-noncovid"))
    assert len(recs) == 82
    assert len({r.patient_id for r in recs}) == 46
    by = Counter(r.raw_label for r in recs)
    assert by["SARS"] == 16 and by["Pneumocystis"] == 12 and by["No Finding"] == 1
    pneumonia = Counter(r.label("pneumonia") for r in recs)
    assert pneumonia == {1: 77, UNLABELLED: 4, 0: 1}  # ARDS (4) is not called pneumonia
    assert all(r.label("covid19") == 0 for r in recs)
    assert all(r.label("mass") == UNLABELLED for r in recs)  # case reports say nothing of nodules
    assert {r.view for r in recs} == {"PA", "AP", "AP SUPINE"}
    assert all(r.population == "adult" for r in recs)  # every listed age is adult or missing


def test_label_mapping_decisions():
    assert kermany_labels("PNEUMONIA") == label_vector(pneumonia=1, covid19=0)
    assert kermany_labels("normal") == label_vector(pneumonia=0, covid19=0)
    assert nih_labels("Nodule") == label_vector(pneumonia=0, mass=1, covid19=0)
    assert nih_labels("Consolidation|Mass") == label_vector(pneumonia=1, mass=1, covid19=0)
    assert nih_labels("Infiltration")[0] == UNLABELLED  # too close to pneumonia to call negative
    assert nih_labels("No Finding") == label_vector(0, 0, 0)
    assert covid_collection_labels("COVID-19") == label_vector(pneumonia=1, covid19=1)
    assert covid_collection_labels("") == label_vector()
    with pytest.raises(ValueError):
        kermany_labels("OTHER")
    assert rsna_normal_labels("No Finding") == label_vector(0, 0, 0)
    with pytest.raises(ValueError):
        rsna_normal_labels("Lung Opacity")  # never guessed: the folder holds normals only
    assert ieee8023_noncovid_labels("Klebsiella") == label_vector(pneumonia=1, covid19=0)
    assert ieee8023_noncovid_labels("ARDS") == label_vector(covid19=0)
    assert ieee8023_noncovid_labels("No Finding") == label_vector(pneumonia=0, covid19=0)
    with pytest.raises(ValueError):
        ieee8023_noncovid_labels("COVID-19")
