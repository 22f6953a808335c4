"""The triage result of one study as a Comprehensive 3D SR with TID 1500 at its root (IHE AIR).

Tree (``dsrdump`` shows it):

* Imaging Measurement Report (TID 1500): language, observer = the algorithm as a device,
  procedure reported = plain X-ray of chest (no Image Library: highdicom's needs Patient
  Orientation and Imager Pixel Spacing, which real CR headers often lack; each group names
  its source image, and the evidence sequence lists them all);
* Imaging Measurements: one Measurement Group (TID 1501) per scored image and finding, with
  the finding's code as Finding Type, the algorithm (name, version, preprocessing version),
  the source image, Probability and Threshold Value as numbers (UCUM "1"), a qualitative
  evaluation (finding: Present when flagged at the site's operating point, else Absent), and
  in words whether the finding is flagged and whether it steers the worklist priority;
* Qualitative Evaluations: the priority, its reason, the model, and the disclaimer.

Private concepts use the local scheme ``99XRT`` (PS3.16 8.2: "99" prefixed designators are
private); the conformance statement lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_io.derived import DISCLAIMER, MANUFACTURER, Algorithm, derived_uid, finish_derived, quiet_person_names

SR_SERIES_NUMBER = 9901
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain X-ray of chest")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PRIORITY = Code("PRIORITY", "99XRT", "Worklist priority")
PRIORITY_REASON = Code("PRIORITY_REASON", "99XRT", "Priority reason")
FLAGGED = Code("FLAGGED", "99XRT", "Flagged at the site operating point")
STEERS = Code("STEERS", "99XRT", "Steers worklist priority")
MODEL = Code("MODEL", "99XRT", "Model")
COMMENT = codes.DCM.Comment


@dataclass(frozen=True)
class FindingResult:
    """One finding on one image, as the scoring service judged it."""

    name: str
    display: str
    code: Code
    probability: float
    threshold: float
    flagged: bool
    steers: bool
    # Why the finding does or does not steer, in words (e.g. "informational at this site").
    steering_note: str = ""


@dataclass(frozen=True)
class ImageResult:
    """A scored source image: its header (no pixels needed) and its findings."""

    source: Dataset
    findings: Sequence[FindingResult]


@dataclass(frozen=True)
class TriageReport:
    """Everything the SR says; `when` is the time the result was stored (so a rebuild is identical)."""

    study_uid: str
    images: Sequence[ImageResult]
    priority: str
    reason: str
    algorithm: Algorithm
    when: datetime


def report_uids(report: TriageReport) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID): the same study, model and source images give the same SR."""
    sources = sorted(str(image.source.SOPInstanceUID) for image in report.images)
    series = derived_uid("sr-series", report.study_uid, report.algorithm.ref)
    return series, derived_uid("sr", report.study_uid, report.algorithm.ref, *sources)


def _text(name: Code, value: str, relationship: RelationshipTypeValues) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=relationship)


def _group(
    image: ImageResult, finding: FindingResult, algorithm: Algorithm, n: int
) -> MeasurementsAndQualitativeEvaluations:
    source = image.source
    sop_uid = str(source.SOPInstanceUID)
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=[f"preprocessing {algorithm.preprocessing_version}"]
    )
    unit = codes.UCUM.NoUnits
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid("tracking", sop_uid, algorithm.ref, finding.name),
            identifier=f"{finding.display}, image {n}",
        ),
        finding_type=finding.code,
        algorithm_id=algorithm_id,
        source_images=[SourceImageForMeasurementGroup(str(source.SOPClassUID), sop_uid)],
        measurements=[
            Measurement(name=codes.DCM.Probability, value=round(float(finding.probability), 6), unit=unit),
            Measurement(
                name=CodedConcept("122411", "DCM", "Threshold Value"), value=float(finding.threshold), unit=unit
            ),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(finding.code, codes.SCT.Present if finding.flagged else codes.SCT.Absent)
        ],
    )
    steering = "yes" if finding.steers else "no"
    if finding.steering_note:
        steering = f"{steering} – {finding.steering_note}"
    contains = RelationshipTypeValues.CONTAINS
    group[0].ContentSequence.append(_text(FLAGGED, "yes" if finding.flagged else "no", contains))
    group[0].ContentSequence.append(_text(STEERS, steering[:1000], contains))
    return group


def _summary(report: TriageReport) -> ContainerContentItem:
    contains = RelationshipTypeValues.CONTAINS
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    algorithm = report.algorithm
    container.ContentSequence = ContentSequence(
        [
            _text(PRIORITY, report.priority, contains),
            _text(PRIORITY_REASON, report.reason[:1000], contains),
            _text(
                MODEL,
                f"{algorithm.name} {algorithm.version}, preprocessing {algorithm.preprocessing_version}",
                contains,
            ),
            _text(COMMENT, DISCLAIMER, contains),
        ]
    )
    return container


def build_triage_report(report: TriageReport) -> hd.sr.Comprehensive3DSR:
    """The SR instance for `report`; its UIDs come from ``report_uids``."""
    if not report.images:
        raise ValueError("a triage report needs at least one scored image")
    algorithm = report.algorithm
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.name,
        ),
    )
    groups = [
        _group(image, finding, algorithm, n)
        for n, image in enumerate(report.images, start=1)
        for finding in image.findings
    ]
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    content[0].ContentSequence.append(_summary(report))
    series_uid, sop_uid = report_uids(report)
    with quiet_person_names():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[image.source for image in report.images],
            content=content[0],
            series_instance_uid=series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
        )
    finish_derived(sr, algorithm, report.when, f"AI triage {algorithm.name} (not for diagnostic use)")
    return sr
