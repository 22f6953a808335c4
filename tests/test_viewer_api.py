"""The viewer's data over HTTP, and the rules the study page follows for heatmaps.

* ``/values``: a real radiograph in the spool comes back as gzip-encoded 16-bit values whose
  headers carry the geometry and the pixel path's window; sizes are checked; a login is needed.
* ``/api/legend/heatmap.png``: the overlays' colour ramp, low heat blue and high heat red.
* ``heatmap_notes.overlays``: one default map (the highest flagged steering finding), none for
  informational or below-threshold findings, and notes that say what each map can show.
* ``localtime``: the site's zone, to the minute; ``web.time_zone`` refuses unknown zones.
* ``decide``: the flagged findings that steer are recorded apart from the informational ones.
"""

from __future__ import annotations

import io
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from db.models import Instance, Series, StudyState
from dicom_io.pixels import render_display
from models.heatmap_image import ramp
from settings import WebConfig
from tests.conftest import REPO, pydicom_data_file
from tests.plugins.worklist import WorklistApp
from triage.policy import InstanceOutcome, decide
from worklist.heatmap_notes import card_localisation, heatmap_note, overlays
from worklist.localtime import dicom_date, local_time, site_zone, zone_label


def _with_instance(worklist: WorklistApp, uid: str, source: Path) -> str:
    """A study whose one instance is `source`, copied into the app's spool."""
    worklist.add_study(uid, flagged=("pneumonia",))
    spool = Path(worklist.settings.storage.spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, spool / "film.dcm")
    sop = f"{uid}.9.1"
    with worklist.session() as s:
        series = s.query(Series).filter_by(series_uid=f"{uid}.1").one()
        s.add(
            Instance(
                sop_instance_uid=sop,
                series_id=series.id,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path="film.dcm",
                sha256="a" * 64,
                size_bytes=source.stat().st_size,
                calling_ae="CR_ROOM1",
            )
        )
        s.commit()
    return sop


def test_values_endpoint_sends_the_films_values_and_window(worklist: WorklistApp) -> None:
    film = pydicom_data_file("RG1_UNCR.dcm")
    sop = _with_instance(worklist, "8.1", film)
    url = f"/api/studies/8.1/instances/{sop}/values"
    assert worklist.client().get(url).status_code == 401  # a login first

    client, _ = worklist.logged_in("alice")
    raw = client.get(url, headers={"Accept-Encoding": "identity"})
    assert raw.status_code == 200 and raw.headers["content-encoding"] == "gzip"
    h = raw.headers
    rows, cols = int(h["x-viewer-rows"]), int(h["x-viewer-columns"])
    assert (rows, cols) == (1024, 964) and (h["x-viewer-full-rows"], h["x-viewer-full-columns"]) == ("1955", "1841")
    assert (float(h["x-viewer-window-center"]), float(h["x-viewer-window-width"])) == (15000.0, 30000.0)
    assert h["x-viewer-window-source"] == "Window Center/Width" and h["x-viewer-invert"] == "1"
    values = np.frombuffer(raw.content, dtype="<u2")  # httpx already inflated the body
    # The film's whole value range is used (the extremes are averaged away by the resize a little).
    assert values.size == rows * cols and values.min() < 2000 and values.max() > 60000
    # Windowed as the browser does, they are the model's rendering.
    low, high = float(h["x-viewer-low"]), float(h["x-viewer-high"])
    x = low + values.reshape(rows, cols) * ((high - low) / 65535)
    shown = np.round((1 - np.clip((x - 0.0) / 30000.0, 0, 1)) * 255)
    assert np.abs(shown - render_display(film, max_size=1024)).mean() < 0.6

    full = client.get(url, params={"size": 4096})
    assert (full.headers["x-viewer-rows"], full.headers["x-viewer-columns"]) == ("1955", "1841")
    bad = client.get(url, params={"size": 999})
    assert bad.status_code == 422 and "size must be one of" in bad.json()["error"]
    assert client.get(f"/api/studies/8.1/instances/{sop}.7/values").status_code == 404


def test_legend_is_the_overlays_ramp(worklist: WorklistApp) -> None:
    client, _ = worklist.logged_in("alice")
    # (and a worklist order that does not exist is refused, naming the choices)
    bad = client.get("/api/worklist", params={"order": "alphabetical"})
    assert bad.status_code == 422 and "unread_first" in bad.text and "priority" in bad.text
    r = client.get("/api/legend/heatmap.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        strip = np.asarray(im.convert("RGB"))
    assert strip.shape == (12, 256, 3)
    expected = (ramp(np.array([0.0, 1.0], dtype=np.float32)) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(strip[0, [0, -1]], expected)
    assert strip[0, 0, 2] > strip[0, 0, 0] and strip[0, -1, 0] > strip[0, -1, 2]  # blue low, red high


LOCALISATION = {
    "n": 298,
    "tolerance_px": 16.0,
    "share_max_within_tolerance": 0.537,
    "share_inside_large_ge15mm": 0.796,
    "share_inside_small_lt15mm": 0.012,
}


def test_one_map_by_default_and_never_an_informational_or_below_threshold_one() -> None:
    maps = {"pneumonia": "/p.png", "mass": "/m.png", "covid19": "/c.png"}
    scores = {"pneumonia": 0.7, "mass": 0.9, "covid19": 0.2}
    thresholds = {"pneumonia": 0.6, "mass": 0.3, "covid19": 0.5}
    # mass is flagged by more but does not steer: pneumonia's map is the one shown first.
    got = {o["finding"]: o for o in overlays(maps, scores, thresholds, {"pneumonia", "covid19"}, LOCALISATION)}
    assert [f for f, o in got.items() if o["default"]] == ["pneumonia"]
    assert list(got) == ["pneumonia", "mass", "covid19"]  # model order
    assert got["mass"]["steering"] is False and "informational at this site" in got["mass"]["note"]
    assert "54%" in got["mass"]["note"] and "80%" in got["mass"]["note"] and "1%" in got["mass"]["note"]
    assert got["covid19"]["above_threshold"] is False and got["covid19"]["steering"] is None
    assert got["pneumonia"]["note"].startswith("Not validated for localisation")
    # Only an informational finding flagged: no map is drawn unasked.
    assert not any(o["default"] for o in overlays(maps, scores, thresholds, {"covid19"}, None))
    # Steering unknown (a study scored before it was recorded): the best flagged map, no "informational".
    unknown = overlays(maps, scores, thresholds, None, None)
    assert [o["finding"] for o in unknown if o["default"]] == ["mass"]
    assert all(o["steering"] is None for o in unknown)
    assert heatmap_note("mass", None, None).startswith("Not validated for localisation")


def test_the_mass_note_quotes_the_shipped_cards_figures_for_its_own_model_only() -> None:
    import json

    from settings import Settings

    card = json.loads((REPO / "models" / "default" / "card.json").read_text())
    ref = f"{card['name']}@{card['version']}"
    figures = card_localisation(Settings(), ref)
    assert figures is not None and figures["n"] > 0 and 0 < figures["share_max_within_tolerance"] < 1
    assert f"{figures['share_max_within_tolerance']:.0%}" in heatmap_note("mass", True, figures)
    assert card_localisation(Settings(), "another-model@1.0.0") is None  # another model's figures are not these


def test_times_in_the_site_zone_to_the_minute() -> None:
    berlin = site_zone("Europe/Berlin")
    assert local_time("2026-12-06T13:05:59.123456+00:00", berlin) == "2026-12-06 14:05"
    assert local_time(datetime(2026, 7, 1, 10, 0, 7, tzinfo=UTC), berlin, seconds=True) == "2026-07-01 12:00:07"
    assert local_time("2026-12-06T13:05:00", berlin) == "2026-12-06 14:05"  # naive = UTC, as stored
    assert local_time(None, berlin) == "" and zone_label(berlin).startswith("Europe/Berlin (CE")
    assert zone_label(site_zone("UTC")) == "UTC"
    assert dicom_date("20240301") == "2024-03-01" and dicom_date("2024") == "2024" and dicom_date(None) == ""
    assert WebConfig(time_zone=" America/New_York ").time_zone == "America/New_York"
    assert WebConfig(time_zone="").time_zone is None
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        WebConfig(time_zone="Mars/Olympus")


def test_decision_records_which_flagged_findings_steer() -> None:
    from settings import TriageConfig

    scored = InstanceOutcome("1.2.3", StudyState.SCORED, scores={"pneumonia": 0.8, "mass": 0.9, "covid19": 0.1})
    thresholds = {"pneumonia": 0.5, "mass": 0.3, "covid19": 0.5}
    d = decide([scored], thresholds, TriageConfig(), steering={"pneumonia", "covid19"})
    assert (d.flagged_findings, d.steering_findings, d.top_finding) == (",pneumonia,mass,", ",pneumonia,", "pneumonia")
    none_steer = decide([scored], thresholds, TriageConfig(), steering={"covid19"})
    assert (none_steer.flagged_findings, none_steer.steering_findings) == (",pneumonia,mass,", ",")
