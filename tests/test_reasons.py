"""Failed and ineligible studies in words for the radiologist; the technical detail for admins only."""

from __future__ import annotations

from tests.plugins.worklist import WorklistApp
from worklist.reasons import plain_reason

TRUNCATED = "AI error: TruncatedPixelData: Pixel Data holds 2000 bytes but Rows 512 x Columns 512 needs 524288"


def test_plain_reasons() -> None:
    assert plain_reason("failed", TRUNCATED) == "image could not be decoded: the file is incomplete"
    assert plain_reason("failed", "ValueError: unable to decode JPEG 2000 codestream") == "image could not be decoded"
    assert plain_reason("failed", "AI error: RuntimeError: model missing") == "the AI could not process this study"
    assert plain_reason("ineligible", "ineligible: modality MR; ineligible: modality MR; body part KNEE") == (
        "outside what the model reads: modality MR; body part KNEE"  # each reason once, no repeated prefix
    )
    assert plain_reason("scored", None) is None


def test_plain_reasons_of_a_png_or_jpeg_outside_what_the_model_reads() -> None:
    """The pixel checks (dicom_io.image_scope) write their reasons as words already: a
    radiologist reads them with the header rules' prefix, each once."""
    technical = "ineligible: colour image, not a radiograph; image 3.1 times as wide as tall"
    assert plain_reason("ineligible", technical) == (
        "outside what the model reads: colour image, not a radiograph; image 3.1 times as wide as tall"
    )
    assert plain_reason("ineligible", "ineligible: image too small (100x90 pixels, at least 128 on each side)") == (
        "outside what the model reads: image too small (100x90 pixels, at least 128 on each side)"
    )
    assert plain_reason("ineligible", "ineligible: image nearly blank (almost no contrast)") == (
        "outside what the model reads: image nearly blank (almost no contrast)"
    )


def test_a_radiologist_sees_words_and_an_admin_also_the_detail(worklist: WorklistApp) -> None:
    worklist.add_study("5.1", state="failed", state_reason=TRUNCATED)
    worklist.add_study("5.2", state="ineligible", state_reason="ineligible: modality MR")
    rad, _ = worklist.logged_in("rita")
    page = rad.get("/worklist").text
    assert "image could not be decoded: the file is incomplete" in page
    assert "outside what the model reads: modality MR" in page and "ineligible: modality MR" not in page
    assert "TruncatedPixelData" not in page and "2 studies" in page
    items = {i["study_uid"]: i for i in rad.get("/api/worklist").json()["items"]}
    assert items["5.1"]["ai_reason"] == "image could not be decoded: the file is incomplete"
    assert "ai_detail" not in items["5.1"]
    study = rad.get("/api/studies/5.1").json()
    assert "TruncatedPixelData" not in str(study) and "TruncatedPixelData" not in rad.get("/studies/5.1").text

    admin, _ = worklist.logged_in("ada", "admin")
    assert "TruncatedPixelData" in admin.get("/worklist").text
    assert admin.get("/api/studies/5.1").json()["state_reason"] == TRUNCATED
    assert "1 study" in admin.get("/worklist", params={"ai_state": "failed"}).text
