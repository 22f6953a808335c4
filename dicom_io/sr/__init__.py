"""Structured Reports we write: the triage result as a TID 1500 Measurement Report (IHE AIR)."""

from dicom_io.sr.triage_report import FindingResult, ImageResult, TriageReport, build_triage_report

__all__ = ["FindingResult", "ImageResult", "TriageReport", "build_triage_report"]
