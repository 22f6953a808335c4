"""Eligibility: frontal chest radiographs only, every refusal with a stored reason, rules
changed by configuration alone."""

from __future__ import annotations

import pydicom
import pytest

from dicom_io.eligibility import NO_HEADER, check_eligibility
from settings import EligibilityConfig, load_settings

CHEST_PA = {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA", "Rows": 2000, "Columns": 2000}


def test_real_frontal_chests_are_eligible(siim_path, nema_path, rg1) -> None:
    for path in (siim_path, nema_path, rg1["UNCR"], rg1["J2KI"]):
        result = check_eligibility(pydicom.dcmread(path, force=True, stop_before_pixels=True))
        assert result.eligible and result.reason is None, (path, result)


def test_rg3_leg_is_ineligible_by_body_part(rg3_path) -> None:
    result = check_eligibility(pydicom.dcmread(rg3_path))
    assert not result.eligible
    assert result.reason == "ineligible: body part EXTREMITY"


def test_veterinary_lateral_is_ineligible_with_all_reasons(vet_path) -> None:
    result = check_eligibility(pydicom.dcmread(vet_path))
    assert not result.eligible
    assert result.reason is not None and result.reason.startswith("ineligible: ")
    text = " | ".join(result.reasons)
    assert "non-human subject" in text and "CANINE" in text
    assert "body part THORAX" in text
    assert "lateral hint LATERAL" in text


def test_lateral_view_position(siim_path) -> None:
    ds = pydicom.dcmread(siim_path, stop_before_pixels=True)
    ds.ViewPosition = "LL"
    assert check_eligibility(ds).reason == "ineligible: view position LL"


def test_empty_view_position_uses_description_hints(siim_path) -> None:
    ds = pydicom.dcmread(siim_path, stop_before_pixels=True)
    ds.ViewPosition = ""
    ds.SeriesDescription = "view: PA"
    assert check_eligibility(ds).eligible
    ds.SeriesDescription = "Thorax lat."
    assert check_eligibility(ds).reason == "ineligible: view position empty, lateral hint LAT"
    del ds.SeriesDescription
    ds.ProtocolName = "CHEST LATERAL"
    assert not check_eligibility(ds).eligible


def test_view_code_sequence_is_a_hint() -> None:
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399173006", "SCT", "left lateral"
    ds = pydicom.Dataset()
    for key, value in {**CHEST_PA, "ViewPosition": ""}.items():
        setattr(ds, key, value)
    ds.ViewCodeSequence = [code]
    assert "lateral hint LATERAL" in (check_eligibility(ds).reason or "")


def test_empty_body_part_needs_a_frontal_view() -> None:
    assert check_eligibility({**CHEST_PA, "BodyPartExamined": ""}).eligible
    result = check_eligibility({**CHEST_PA, "BodyPartExamined": "", "ViewPosition": ""})
    assert result.reason == "ineligible: body part empty without a frontal view position"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Modality": "CT"}, "modality CT"),
        ({"Modality": ""}, "modality (empty)"),
        ({"BodyPartExamined": "HAND"}, "body part HAND"),
        ({"NumberOfFrames": 3}, "multi-frame (3 frames)"),
        ({"Rows": 100}, "too small (100x2000, minimum 256x256)"),
        ({"Columns": 20000}, "too large (2000x20000, maximum 8192x8192)"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "photometric interpretation PALETTE COLOR"),
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, "non-human subject (species CANIS LUPUS FAMILIARIS)"),
        ({"Rows": None}, "not an image (no Rows/Columns)"),
    ],
)
def test_each_rule_gives_its_reason(change, reason) -> None:
    result = check_eligibility({**CHEST_PA, **change})
    assert not result.eligible
    assert result.reason == f"ineligible: {reason}"


def test_non_image_object_is_ineligible_not_dropped() -> None:
    sr = pydicom.Dataset()
    sr.Modality = "SR"
    result = check_eligibility(sr)
    assert not result.eligible
    assert result.reasons == (
        "not an image (no Rows/Columns)",
        "modality SR",
        "body part empty without a frontal view position",
    )


def test_headerless_images_are_eligible_and_flagged() -> None:
    result = check_eligibility(None)
    assert result.eligible and result.flags == (NO_HEADER,)


def test_rules_change_without_code(tmp_path, vet_path) -> None:
    config = tmp_path / "x.yaml"
    config.write_text(
        "eligibility:\n"
        "  body_parts: [chest, thorax]\n"
        "  view_positions: [PA]\n"
        "  lateral_hints: []\n"
        "  non_human_hints: []\n"
        "  min_rows: 64\n"
        "  min_columns: 64\n"
    )
    rules = load_settings(config, environ={}).eligibility
    assert check_eligibility({**CHEST_PA, "BodyPartExamined": "THORAX"}, rules).eligible
    assert check_eligibility({**CHEST_PA, "ViewPosition": "AP"}, rules).reason == "ineligible: view position AP"
    # With every hint switched off, only the header rules remain for the veterinary file.
    assert check_eligibility(pydicom.dcmread(vet_path), rules).eligible

    env_rules = load_settings(environ={"XRAY_TRIAGE_ELIGIBILITY__ALLOW_MULTIFRAME": "true"}).eligibility
    assert check_eligibility({**CHEST_PA, "NumberOfFrames": 2}, env_rules).eligible


def test_default_rules_match_the_issue() -> None:
    rules = EligibilityConfig()
    assert rules.modalities == ["CR", "DX"] and rules.body_parts == ["CHEST"]
    assert rules.view_positions == ["PA", "AP"] and not rules.allow_multiframe
