"""The DICOM objects we write, built from real chest CRs and validated by dicom3tools and DCMTK.

`dciodvfy` checks each against its IOD (no "Error" line may appear); `dsrdump` must read the
SR tree.  UIDs must repeat for the same inputs and change with the model version.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.derived import DISCLAIMER, PROCESSING_ALGORITHM, Algorithm
from dicom_io.sc import HEATMAP_BANNER, HeatmapCapture, build_heatmap_capture
from dicom_io.sc.heatmap import capture_uids
from dicom_io.send import as_written
from dicom_io.sr import FindingResult, ImageResult, TriageReport, build_triage_report
from dicom_io.sr.triage_report import report_uids
from models.findings import FINDINGS
from tests.conftest import pydicom_data_file, shared_file

WHEN = datetime(2026, 12, 5, 12, 30, tzinfo=UTC)
ALGORITHM = Algorithm("xray-triage-cnn", "2026.12.01", "xtpx-3")


def sources() -> list[Path]:
    return [pydicom_data_file("RG1_J2KR.dcm"), shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")]


def findings(flag: str = "pneumonia") -> list[FindingResult]:
    return [
        FindingResult(f.name, f.display, f.code, 0.1 + 0.3 * i, 0.5, f.name == flag, f.name != "mass", "why " + f.name)
        for i, f in enumerate(FINDINGS)
    ]


def gaussian_heat(rows: int, cols: int) -> np.ndarray:
    """A smooth blob as Grad-CAM makes them, through the product's own colour ramp."""
    from models.heatmap_image import colorize

    y, x = np.mgrid[0:rows, 0:cols]
    heat = np.exp(-(((y - rows * 0.4) / (rows * 0.15)) ** 2 + ((x - cols * 0.3) / (cols * 0.12)) ** 2))
    return colorize(heat)


def validate(tmp: Path, ds: pydicom.Dataset) -> str:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: `make test` installs dicom3tools")
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    report = out.stdout + out.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    return str(path)


@pytest.mark.parametrize("index", [0, 1], ids=["RG1-J2K", "SIIM-JPEG"])
def test_structured_report_is_valid_and_carries_the_result(tmp_path: Path, index: int) -> None:
    source = pydicom.dcmread(sources()[index], stop_before_pixels=True)
    report = TriageReport(
        str(source.StudyInstanceUID),
        [ImageResult(source, findings())],
        "urgent",
        "pneumonia 0.10 ≥ 0.05 | x^y",
        ALGORITHM,
        WHEN,
    )
    sr = as_written(build_triage_report(report))
    path = validate(tmp_path, sr)
    tree = subprocess.run(["dsrdump", path], capture_output=True, text=True, check=True).stdout
    assert "Imaging Measurement Report" in tree and "Plain X-ray of chest" in tree
    for f in FINDINGS:
        assert f"({f.code.value},SCT," in tree  # each finding, coded
    assert '"Probability")="0.1"' in tree and "Threshold Value" in tree
    assert '(52101004,SCT,"Present")' in tree and '(272519000,SCT,"Absent")' in tree
    assert '"Worklist priority")="urgent"' in tree
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    item = sr.ContributingEquipmentSequence[-1]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        PROCESSING_ALGORITHM.value,
        "99IHE",
        "Processing Algorithm",
    )
    assert item.DeviceUID == ALGORITHM.device_uid and list(item.SoftwareVersions) == ["2026.12.01", "xtpx-3"]
    texts = [e.value for e in sr.iterall() if e.keyword == "TextValue"]
    assert DISCLAIMER in texts and "pneumonia 0.10 ≥ 0.05 | x^y" in texts  # UTF-8 kept intact


def test_uids_repeat_for_the_same_result_and_change_with_the_model() -> None:
    source = pydicom.dcmread(sources()[0], stop_before_pixels=True)
    report = TriageReport(
        str(source.StudyInstanceUID), [ImageResult(source, findings())], "urgent", "r", ALGORITHM, WHEN
    )
    again = TriageReport(
        str(source.StudyInstanceUID), [ImageResult(source, findings())], "routine", "r2", ALGORITHM, WHEN
    )
    newer = Algorithm(ALGORITHM.name, "2027.01.01", ALGORITHM.preprocessing_version)
    other = TriageReport(str(source.StudyInstanceUID), [ImageResult(source, findings())], "urgent", "r", newer, WHEN)
    assert report_uids(report) == report_uids(again)
    assert report_uids(other)[1] != report_uids(report)[1] and newer.device_uid != ALGORITHM.device_uid
    assert all(len(uid) <= 64 and uid.startswith("2.25.") for uid in report_uids(report))
    full = pydicom.dcmread(sources()[0])
    heat = gaussian_heat(64, 64)
    one = HeatmapCapture(full, heat, "pneumonia", "Pneumonia", 0, ALGORITHM, WHEN)
    two = HeatmapCapture(full, heat, "covid19", "COVID-19", 2, ALGORITHM, WHEN)
    assert capture_uids(one) == capture_uids(HeatmapCapture(full, heat, "pneumonia", "Pneumonia", 0, ALGORITHM, WHEN))
    assert capture_uids(one)[0] != capture_uids(two)[0]  # a series per finding


@pytest.mark.parametrize("index", [0, 1], ids=["RG1-J2K", "SIIM-JPEG"])
def test_heatmap_capture_is_valid_on_the_source_geometry_with_a_banner(tmp_path: Path, index: int) -> None:
    source = pydicom.dcmread(sources()[index])
    rows, cols = int(source.Rows), int(source.Columns)
    capture = HeatmapCapture(source, gaussian_heat(rows // 8, cols // 8), "pneumonia", "Pneumonia", 0, ALGORITHM, WHEN)
    sc = as_written(build_heatmap_capture(capture))
    validate(tmp_path, sc)
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation) == (rows, cols, 3, "RGB")
    assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and "Pneumonia" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert HEATMAP_BANNER in sc.DerivationDescription
    pixels = sc.pixel_array
    band = max(16, rows // 28)
    top = pixels[:band]
    assert (top.max(axis=2) > 200).mean() > 0.003 and (top.max(axis=2) < 30).mean() > 0.5  # white text on black
    body = pixels[band:].astype(int)
    colour = np.abs(body[..., 0] - body[..., 2])
    # The heat sits where the blob is (upper left of the lungs), the rest stays grey.
    y0, x0 = int(rows * 0.4) - band, int(cols * 0.3)
    assert colour[y0 - 5 : y0 + 5, x0 - 5 : x0 + 5].mean() > 40
    assert colour[-rows // 10 :, -cols // 10 :].mean() < 2
