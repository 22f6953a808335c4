"""The analyse page and /api/analyse give no scores for an image the model should not read.

A DICOM is refused by the same header rules as the worker's (a leg, an MR, a lateral film);
a PNG or JPEG by the plain pixel checks (a colour photograph, a strip cut from a film).  What
comes back is the reason, as stored and in words, the notes and the image; never a score, a
flag or a heatmap.  Real files only: the shipped model, real films, a real photograph.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.findings import DISCLAIMER
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins.ingest import Backend
from tests.plugins.worklist import WorklistApp, csrf_from
from tests.test_image_scope import FILM, photograph

UNSCORED = {"scores": {}, "thresholds": {}, "flags": {}, "heatmaps": {}, "top_findings": [], "informational": []}


@pytest.fixture
def backend(sqlite_backend: Backend) -> Backend:
    """Analysing stores nothing but an audit line: one database is enough."""
    return sqlite_backend


def strip_png() -> bytes:
    """A real adult film (512x512) cut to a strip 512 wide and 200 tall."""
    with Image.open(shared_file(*FILM)) as film:
        buf = io.BytesIO()
        film.crop((0, 150, 512, 350)).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(path: Path, **changes: str) -> bytes:
    """A real DICOM with some header values changed, as a modality would have sent it."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def analyse(client: TestClient, token: str, name: str, data: bytes) -> dict[str, Any]:
    r = client.post("/api/analyse", files={"file": (name, data)}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_unscored(body: dict[str, Any], reason: str, plain: str) -> None:
    """No score of any kind; the reason as stored and in words; the image and the disclaimer."""
    assert body["eligible"] is False
    assert {k: body[k] for k in UNSCORED} == UNSCORED, body
    assert body["reason"] == reason
    assert body["ai_reason"] == plain
    assert (body["priority"], body["disclaimer"]) == ("routine", DISCLAIMER)
    assert reason in body["priority_reason"]  # "AI unavailable – read as usual (<reason>)", as the worker says
    shown = Image.open(io.BytesIO(base64.b64decode(body["image_png"].removeprefix("data:image/png;base64,"))))
    assert shown.format == "PNG" and min(shown.size) > 0


def test_png_and_jpeg_outside_what_the_model_reads_get_no_scores(make_worklist) -> None:
    wl: WorklistApp = make_worklist()
    client, token = wl.logged_in("alice")

    photo = analyse(client, token, "hopper.jpg", photograph().read_bytes())
    assert_unscored(
        photo,
        "ineligible: colour image, not a radiograph",
        "outside what the model reads: colour image, not a radiograph",
    )
    assert photo["kind"] == "jpeg" and "no DICOM header" in photo["notes"]
    assert Image.open(io.BytesIO(base64.b64decode(photo["image_png"].split(",", 1)[1]))).size == (512, 600)

    strip = analyse(client, token, "strip.png", strip_png())
    assert_unscored(
        strip,
        "ineligible: image 2.6 times as wide as tall",
        "outside what the model reads: image 2.6 times as wide as tall",
    )

    # The same film uncut is a chest film: scored, with a heatmap per finding.
    film = analyse(client, token, "film.png", shared_file(*FILM).read_bytes())
    assert film["eligible"] is True and film["reason"] is None and film["ai_reason"] is None
    assert set(film["scores"]) == set(film["heatmaps"]) == {"pneumonia", "mass", "covid19"}
    assert [e.action for e in wl.audit() if e.action == "analyse"] == ["analyse"] * 3


def test_a_dicom_the_worker_would_not_score_gets_no_scores(make_worklist) -> None:
    """The worker's rules (dicom_io.eligibility) on a real chest CR relabelled, and on a real leg."""
    wl: WorklistApp = make_worklist()
    client, token = wl.logged_in("alice")
    chest = pydicom_data_file("RG1_UNCR.dcm")
    for name, data, reason in (
        ("leg.dcm", dicom_bytes(chest, BodyPartExamined="LEG"), "ineligible: body part LEG"),
        ("mr.dcm", dicom_bytes(chest, Modality="MR"), "ineligible: modality MR"),
        ("lateral.dcm", dicom_bytes(chest, ViewPosition="LL"), "ineligible: view position LL"),
        ("rg3.dcm", pydicom_data_file("RG3_UNCR.dcm").read_bytes(), "ineligible: body part EXTREMITY"),
    ):
        body = analyse(client, token, name, data)
        assert_unscored(body, reason, reason.replace("ineligible:", "outside what the model reads:"))
        assert body["kind"] == "dicom", name
    # The same file as sent is eligible and scored: only the header changed the verdict.
    body = analyse(client, token, "rg1.dcm", chest.read_bytes())
    assert body["eligible"] is True and len(body["scores"]) == 3


def test_a_site_that_reads_wider_films_tunes_the_bound(make_worklist) -> None:
    wl: WorklistApp = make_worklist(eligibility={"headerless": {"max_aspect": 3.0}})
    client, token = wl.logged_in("alice")
    body = analyse(client, token, "strip.png", strip_png())
    assert body["eligible"] is True and set(body["scores"]) == {"pneumonia", "mass", "covid19"}


def test_the_page_shows_the_reason_and_the_image_and_no_score(make_worklist) -> None:
    wl: WorklistApp = make_worklist()
    client, _ = wl.logged_in("alice")
    token = csrf_from(client.get("/analyse").text)
    r = client.post("/analyse", data={"csrf_token": token}, files={"file": ("hopper.jpg", photograph().read_bytes())})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    shown = re.search(r'<p class="ai ai-ineligible" id="ineligible">([^<]*)</p>', html)
    assert shown and shown.group(1) == "Not scored – outside what the model reads: colour image, not a radiograph"
    for absent in ('id="analysis-scores"', 'id="top-findings"', 'id="analysis-priority"', 'class="heatmap"'):
        assert absent not in html, absent
    assert re.search(r'<img class="radiograph" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', html)
    notes = re.search(r'id="analysis-notes">([^<]*)</p>', html)
    assert notes and "no DICOM header" in notes.group(1)
    assert "not for diagnostic use" in html.lower()


def test_an_ineligible_dicom_whose_pixels_cannot_be_shown_still_says_why(make_worklist) -> None:
    """Its header is the answer; a broken pixel stream only costs the picture."""
    wl: WorklistApp = make_worklist()
    client, token = wl.logged_in("alice")
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    ds.Modality = "MR"
    ds.PixelData = bytes(ds.PixelData)[:4000]  # cut short: the frame cannot be decoded
    buf = io.BytesIO()
    ds.save_as(buf)
    r = client.post("/api/analyse", files={"file": ("cut.dcm", buf.getvalue())}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["eligible"] is False and body["reason"] == "ineligible: modality MR"
    assert body["image_png"] is None and body["scores"] == {} and body["heatmaps"] == {}
    page_token = csrf_from(client.get("/analyse").text)
    html = client.post("/analyse", data={"csrf_token": page_token}, files={"file": ("cut.dcm", buf.getvalue())}).text
    assert "No image: its pixels could not be decoded" in html and 'id="ineligible"' in html
