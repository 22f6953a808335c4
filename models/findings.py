"""The one definition of what the model scores: finding names, label mapping, thresholds.

The worker, the worklist, training and evaluation all import this module, so a finding is
renamed or re-mapped in exactly one place.  Each dataset labels only some findings; a finding
a dataset says nothing about is ``UNLABELLED`` (masked out of the loss), never a guessed 0,
because a guessed negative teaches the model which *dataset* an image came from.

Label mapping (decided here, documented in docs/training.md):

* Kermany (paediatric, 2013-2017): ``PNEUMONIA`` -> pneumonia=1, ``NORMAL`` -> pneumonia=0;
  covid19=0 (the data predates COVID-19); mass unlabelled (never reported for these images,
  and labelling every child "no mass" would teach "child" as the negative class for mass).
* NIH ChestX-ray14 (adult, 2017): mass = ``Mass`` or ``Nodule`` (both focal opacities);
  pneumonia = 1 for ``Pneumonia`` or ``Consolidation``, 0 for ``No Finding`` or only
  non-airspace findings, unlabelled when the only airspace findings are ``Infiltration``,
  ``Atelectasis``, ``Edema`` or ``Effusion`` (report-mined labels that overlap pneumonia too
  much to call negative); covid19=0 (2017).
* COVID collections: ``COVID-19`` -> covid19=1 and pneumonia=1 (viral pneumonia), mass
  unlabelled; ``Pneumonia`` -> pneumonia=1, covid19=0; ``No finding`` -> all three 0; a blank
  finding -> all unlabelled (the image is kept for nothing but counting).
* RSNA adult normals (NIH films judged normal by RSNA radiologists): all three 0; these are
  the only labelled negatives for mass besides NIH ``No Finding``.
* ieee8023 non-COVID rows (adult case reports): bacterial, viral and fungal pneumonia,
  Pneumocystis, SARS, lipoid pneumonia -> pneumonia=1; ``ARDS`` -> pneumonia unlabelled (diffuse
  airspace disease without infection, like NIH ``Edema``); ``No Finding`` -> pneumonia=0;
  covid19=0 for every row (COVID-19 rows were removed from this folder); mass unlabelled (case
  reports of pneumonia say nothing about nodules).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

DISCLAIMER = "Decision support – not for diagnostic use."
UNLABELLED = -1
POSITIVE = 1
NEGATIVE = 0
# Triage wants to miss few positives: thresholds are chosen on validation for this sensitivity.
DEFAULT_TARGET_SENSITIVITY = 0.95


@dataclass(frozen=True)
class Finding:
    """One output of the model: what it means and where its labels come from."""

    name: str
    display: str
    description: str
    # Used only when a model card carries no threshold of its own (e.g. an untrained model).
    default_threshold: float
    # The coded concept our DICOM SR and HL7 results use for it (docs/conformance.md says why).
    code: Code


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "pneumonia",
        "Pneumonia",
        "Airspace pneumonia (bacterial or viral, incl. COVID-19) or consolidation",
        0.5,
        # Not in pydicom's code dictionary (which holds only codes named by DICOM's context groups).
        Code("233604007", "SCT", "Pneumonia"),
    ),
    # SNOMED CT "Mass" (CID 6335 and others): the focal opacity; a nodule is a small mass.
    Finding("mass", "Mass / nodule", "Focal pulmonary opacity: NIH 'Mass' or 'Nodule'", 0.5, codes.SCT.Mass),
    Finding(
        "covid19",
        "COVID-19",
        "COVID-19 pneumonia pattern (collections of 2020)",
        0.5,
        Code("840539006", "SCT", "COVID-19"),
    ),
)
FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS)
FINDING_INDEX: dict[str, int] = {n: i for i, n in enumerate(FINDING_NAMES)}

# NIH findings that are not airspace opacities: an image with only these is pneumonia-negative.
_NIH_NON_AIRSPACE = frozenset(
    {"Mass", "Nodule", "Cardiomegaly", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "Pneumothorax"}
)
_NIH_PNEUMONIA = frozenset({"Pneumonia", "Consolidation"})
_NIH_MASS = frozenset({"Mass", "Nodule"})


def get_finding(name: str) -> Finding:
    """Look a finding up by name; a KeyError names the valid ones, so CLI typos explain themselves."""
    try:
        return FINDINGS[FINDING_INDEX[name]]
    except KeyError:
        raise KeyError(f"unknown finding {name!r}; choose from {', '.join(FINDING_NAMES)}") from None


def label_vector(pneumonia: int = UNLABELLED, mass: int = UNLABELLED, covid19: int = UNLABELLED) -> tuple[int, ...]:
    """Labels in model-output order; keyword-only use keeps call sites readable and order-proof."""
    values = {"pneumonia": pneumonia, "mass": mass, "covid19": covid19}
    return tuple(int(values[n]) for n in FINDING_NAMES)


def kermany_labels(class_name: str) -> tuple[int, ...]:
    """Kermany folder name -> labels (NORMAL / PNEUMONIA, case-insensitive)."""
    c = class_name.strip().upper()
    if c == "PNEUMONIA":
        return label_vector(pneumonia=POSITIVE, covid19=NEGATIVE)
    if c == "NORMAL":
        return label_vector(pneumonia=NEGATIVE, covid19=NEGATIVE)
    raise ValueError(f"unknown Kermany class folder {class_name!r} (expected NORMAL or PNEUMONIA)")


def nih_labels(finding_labels: str) -> tuple[int, ...]:
    """NIH ``Finding Labels`` ('A|B|C' or 'No Finding') -> labels."""
    found = {s.strip() for s in finding_labels.split("|") if s.strip()}
    if not found:
        raise ValueError("empty NIH Finding Labels")
    mass = POSITIVE if found & _NIH_MASS else NEGATIVE
    if found & _NIH_PNEUMONIA:
        pneumonia = POSITIVE
    elif found == {"No Finding"} or found <= _NIH_NON_AIRSPACE:
        pneumonia = NEGATIVE
    else:
        pneumonia = UNLABELLED
    return label_vector(pneumonia=pneumonia, mass=mass, covid19=NEGATIVE)


def covid_collection_labels(finding: str) -> tuple[int, ...]:
    """COVID collections' ``finding`` column -> labels; blank means unknown, not negative."""
    f = finding.strip().lower().replace("_", " ")
    if not f:
        return label_vector()
    if f in {"covid-19", "covid-19 pneumonia", "covid19"}:
        return label_vector(pneumonia=POSITIVE, covid19=POSITIVE)
    if f == "no finding":
        return label_vector(pneumonia=NEGATIVE, mass=NEGATIVE, covid19=NEGATIVE)
    if f == "pneumonia":
        return label_vector(pneumonia=POSITIVE, covid19=NEGATIVE)
    return label_vector()


def rsna_normal_labels(finding: str) -> tuple[int, ...]:
    """RSNA adult normals: ``No Finding`` only; anything else is refused rather than guessed."""
    if finding.strip().lower() != "no finding":
        raise ValueError(f"unexpected RSNA normals label {finding!r} (expected 'No Finding')")
    return label_vector(pneumonia=NEGATIVE, mass=NEGATIVE, covid19=NEGATIVE)


_IEEE8023_NOT_PNEUMONIA = frozenset({"ards"})


def ieee8023_noncovid_labels(finding: str) -> tuple[int, ...]:
    """ieee8023 non-COVID ``finding`` column -> labels (see the module docstring)."""
    f = finding.strip().lower()
    if not f:
        return label_vector()
    if f == "no finding":
        return label_vector(pneumonia=NEGATIVE, covid19=NEGATIVE)
    if f in _IEEE8023_NOT_PNEUMONIA:
        return label_vector(covid19=NEGATIVE)
    if "covid" in f:
        raise ValueError(f"COVID-19 row {finding!r} in the non-COVID collection")
    return label_vector(pneumonia=POSITIVE, covid19=NEGATIVE)


def labels_array(rows: list[tuple[int, ...]]) -> np.ndarray:
    """Stack label tuples into the (n, n_findings) int8 array the loss and metrics use."""
    if not rows:
        return np.zeros((0, len(FINDING_NAMES)), dtype=np.int8)
    return np.asarray(rows, dtype=np.int8).reshape(len(rows), len(FINDING_NAMES))
