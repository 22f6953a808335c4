"""`xray-triage predict --json` on the real DICOM files: the stable interface of the model."""

from __future__ import annotations

import json

import pytest

from models.findings import DISCLAIMER, FINDING_NAMES
from tests.conftest import pydicom_data_file, shared_file
from xray_triage.cli import main

KEYS = {"path", "eligible", "reason", "scores", "flags", "model", "priority", "priority_reason"}


def _predict(model_dir, files, capsys, json_out=True):
    argv = ["predict", "--model", str(model_dir), *map(str, files)]
    rc = main([*argv, "--json"] if json_out else argv)
    out = capsys.readouterr().out
    return rc, out


def test_predict_json_on_real_dicom(tiny_model_dir, capsys):
    files = [
        shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"),
        shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm"),
        shared_file("dicom", "dx_for_presentation_animal_lateral.dcm"),
        pydicom_data_file("RG1_UNCR.dcm"),
        shared_file("kermany", "train", "NORMAL", "IM-0115-0001.jpeg"),
    ]
    rc, out = _predict(tiny_model_dir, files, capsys)
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(files)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    for r in rows:
        assert set(r) == KEYS
        assert r["model"] == "tiny@0.0.1"
    siim = by_name["siim_cr_chest_pa_jpeg_baseline.dcm"]
    assert siim["eligible"] is True and siim["reason"] is None
    assert list(siim["scores"]) == list(FINDING_NAMES)
    assert all(0.0 <= v <= 1.0 for v in siim["scores"].values())
    assert all(isinstance(siim["flags"][f], bool) for f in FINDING_NAMES)
    animal = by_name["dx_for_presentation_animal_lateral.dcm"]
    assert animal["eligible"] is False and animal["reason"]
    assert not any(animal["flags"].get(f) for f in FINDING_NAMES)  # never flagged when ineligible
    # An ineligible file is never urgent: the worker's "AI unavailable" routine, with the reason.
    assert animal["priority"] == "routine" and animal["reason"] in animal["priority_reason"]
    assert siim["priority"] in ("routine", "urgent", "critical") and siim["priority_reason"]
    jpeg = by_name["IM-0115-0001.jpeg"]
    assert jpeg["eligible"] is True and jpeg["scores"] is not None  # header-less images are scored


def test_predict_reports_unreadable_files_per_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "not_an_image.dcm"
    bad.write_bytes(b"this is not DICOM")
    good = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    broken = tmp_path / "broken.dcm"  # the DICOM preamble, then a meta element whose length overruns the file
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    missing = tmp_path / "gone.dcm"
    rc, out = _predict(tiny_model_dir, [bad, good, broken, missing], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 1  # every file is reported, and the exit status says that some failed
    assert rows[0]["scores"] is None and rows[0]["eligible"] is False
    assert rows[0]["reason"]  # read leniently as a header-less DICOM: the pixel path names what is missing
    assert rows[1]["scores"] is not None
    # pydicom reads a broken file leniently; the pixel path then names what is missing.
    assert rows[2]["scores"] is None and "Pixel Data" in rows[2]["reason"]
    assert rows[3]["scores"] is None and rows[3]["reason"] == "file cannot be opened: FileNotFoundError"
    assert rows[1]["priority"] and rows[2]["priority"] == rows[3]["priority"] == "routine"
    assert _predict(tiny_model_dir, [good], capsys)[0] == 0


def test_predict_human_format_carries_disclaimer(tiny_model_dir, capsys):
    rc, out = _predict(
        tiny_model_dir, [shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")], capsys, json_out=False
    )
    assert rc == 0
    assert DISCLAIMER in out and "pneumonia" in out and "threshold" in out


def test_shipped_default_model_predicts_and_separates_pneumonia(capsys):
    """The committed model (no --model: models/default) on real held-out validation images."""
    import csv
    from pathlib import Path

    from models.registry import DEFAULT_MODEL_DIR

    split = DEFAULT_MODEL_DIR / "split.csv"
    with split.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val" and r["source"] == "kermany"]
    pos = [r["path"] for r in rows if r["pneumonia"] == "1"][:6]
    neg = [r["path"] for r in rows if r["pneumonia"] == "0"][:6]
    shared_file("kermany")  # skips with a clear message when the real data is absent
    repo = Path(__file__).resolve().parents[1]
    files = [(repo / p).resolve() for p in pos + neg]  # split paths are relative to the checkout
    dicom = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    rc = main(["predict", "--json", str(dicom), *map(str, files)])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(out) == 1 + len(files)
    assert out[0]["model"].startswith("default@") and out[0]["eligible"] is True
    p = [r["scores"]["pneumonia"] for r in out[1:]]
    mean_pos, mean_neg = sum(p[: len(pos)]) / len(pos), sum(p[len(pos) :]) / len(neg)
    assert mean_pos > mean_neg + 0.3


def test_predict_gives_no_scores_outside_what_the_model_reads(tiny_model_dir, tmp_path, capsys):
    """An ineligible file gets its reason and no scores (the worker's rules for a DICOM, the
    pixel checks for a PNG or JPEG); that is an answer about the file, so the exit status is 0."""
    from tests.test_analyse_scope import dicom_bytes, strip_png
    from tests.test_image_scope import photograph

    photo = photograph()
    strip = tmp_path / "strip.png"
    strip.write_bytes(strip_png())
    leg = tmp_path / "leg.dcm"
    leg.write_bytes(dicom_bytes(pydicom_data_file("RG1_UNCR.dcm"), BodyPartExamined="LEG"))
    film = shared_file("kermany", "train", "NORMAL", "IM-0115-0001.jpeg")
    rc, out = _predict(tiny_model_dir, [photo, strip, leg, film], capsys)
    assert rc == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.splitlines())}
    for name, reason in (
        ("grace_hopper.jpg", "ineligible: colour image, not a radiograph"),
        ("strip.png", "ineligible: image 2.6 times as wide as tall"),
        ("leg.dcm", "ineligible: body part LEG"),
    ):
        r = rows[name]
        assert set(r) == KEYS and (r["eligible"], r["scores"], r["reason"]) == (False, None, reason), r
        assert set(r["flags"]) == {"notes"}  # no finding flagged or unflagged: nothing was scored
        assert r["priority"] == "routine" and reason in r["priority_reason"]
    assert "no DICOM header" in rows["strip.png"]["flags"]["notes"]
    assert rows["IM-0115-0001.jpeg"]["eligible"] is True and list(rows["IM-0115-0001.jpeg"]["scores"]) == list(
        FINDING_NAMES
    )

    rc, out = _predict(tiny_model_dir, [photo, film], capsys, json_out=False)
    assert rc == 0 and DISCLAIMER in out
    photo_block, film_block = out.split(f"{film}  [")
    assert "not scored, outside what the model reads: colour image, not a radiograph" in photo_block
    assert "threshold" not in photo_block and "pneumonia" not in photo_block
    assert "threshold" in film_block

    # A file that cannot be read still makes the run a failure, whatever else was refused.
    missing = tmp_path / "gone.png"
    rc, out = _predict(tiny_model_dir, [photo, missing], capsys)
    assert rc == 1 and [json.loads(line)["scores"] for line in out.splitlines()] == [None, None]


def test_predict_help_says_what_ineligible_means_and_the_exit_status(capsys):
    with pytest.raises(SystemExit) as done:
        main(["predict", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "is not scored: its line gives the reason (JSON: eligible false, scores null)" in text
    assert "Exit status 0 when every file was read, scored or not eligible; 1 when at least one could not" in text
