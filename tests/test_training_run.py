"""A tiny real training run (a few steps on a few dozen real images): save, reload, predict,
resume, and an evaluation report with sane values.  The full training never runs in CI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from dicom_io.pixels import to_model_tensor
from models.findings import DISCLAIMER, FINDING_NAMES
from models.registry import TriageModel
from tests.conftest import shared_file
from tests.plugins.training import tiny_config
from training.evaluate import evaluate
from training.splits import leaked_patients, read_split
from training.train import train


def test_tiny_run_saves_reloads_and_predicts(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.keras", "card.json", "card.md", "split.csv", "history.csv"} <= files
    assert leaked_patients(read_split(tiny_model_dir / "split.csv")) == set()
    with (tiny_model_dir / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # one log line per epoch
    model = TriageModel.load(tiny_model_dir)
    x = np.stack([to_model_tensor(shared_file("kermany", "train", "NORMAL", "IM-0115-0001.jpeg"))])
    scores = model.score_tensors(x)
    assert list(scores[0]) == list(FINDING_NAMES)
    assert all(0.0 <= v <= 1.0 for v in scores[0].values())


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = tiny_config(tmp_path, name="resumable", epochs=1)
    train(cfg, resume=False, progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epoch"] == 1
    split_before = (tmp_path / "run" / "split.csv").read_bytes()
    cfg.train["epochs"] = 2  # a longer budget: the second call trains only epoch 2
    train(cfg, resume=True, progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epoch"] == 2
    assert (tmp_path / "run" / "split.csv").read_bytes() == split_before
    with (tmp_path / "run" / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]


def test_evaluation_report(tiny_model_dir, tmp_path):
    out = evaluate(
        tiny_model_dir,
        tiny_model_dir / "split.csv",
        out_dir=tmp_path / "report",
        split="all",
        compare=tiny_model_dir,
        n_boot=50,
        n_examples=4,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["disclaimer"] == DISCLAIMER and metrics["split_file_sha256"]
    for name in FINDING_NAMES:
        m = metrics["findings"][name]
        if m["n_pos"] and m["n_neg"]:
            assert 0.0 <= m["auc"] <= 1.0
            if m["n_pos"] >= 2 and m["n_neg"] >= 2:  # a bootstrap interval needs two of each
                lo, hi = m["auc_ci95"]
                assert lo <= m["auc"] + 1e-9 and m["auc"] - 1e-9 <= hi
            op = m["operating_point"]
            assert op["tp"] + op["fn"] == m["n_pos"] and op["tn"] + op["fp"] == m["n_neg"]
            assert 0.0 <= m["brier"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
    assert metrics["comparison"]["findings"]["pneumonia"]["auc"] == metrics["findings"]["pneumonia"]["auc"]
    for png in ("roc", "pr", "confusion", "confidence", "calibration", "history", "examples"):
        data = (out / f"{png}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    report = (out / "report.md").read_text()
    assert DISCLAIMER in report and "![ROC curves](roc.png)" in report and "AUC [95% CI]" in report


def test_same_seed_same_run(tmp_path):
    """Seeded: two runs of one config give the same split, the same losses and the same thresholds."""
    outs = []
    for i in (1, 2):
        cfg = tiny_config(tmp_path / str(i), name="seeded", epochs=1)
        train(cfg, resume=False, progress=False)
        with (tmp_path / str(i) / "out" / "history.csv").open() as fh:
            hist = list(csv.DictReader(fh))
        card = json.loads((tmp_path / str(i) / "out" / "card.json").read_text())
        outs.append((hist[0]["loss"], card["thresholds"], card["split"]["sha256"]))
    assert outs[0] == outs[1]


def test_a_collection_held_out_of_training_is_judged_on_all_its_images(tmp_path):
    """train_sources without NIH: no NIH film is drawn, and the card reports NIH on every one of
    its films outside validation (which calibrates) and takes the NIH steering evidence from there."""
    from models.card import ModelCard
    from training.splits import read_split

    sources = ["kermany", "rsna-normals", "ieee8023-noncovid", "covid-hannover", "covid-actualmed", "covid-figure1"]
    cfg = tiny_config(tmp_path, name="held", epochs=1, train_sources=sources)
    out = Path(train(cfg, resume=False, progress=False)).parent
    card = ModelCard.load(out)
    held = card.test_metrics["held_out"]
    n_nih = sum(r.source == "nih" and r.given_split != "val" for r in read_split(tmp_path / "run" / "split.csv"))
    assert held["sources"] == ["nih"] and held["n_images"] == n_nih
    nih_pneumonia = next(c for c in held["collections"]["comparisons"] if c["name"].startswith("NIH pneumonia"))
    assert card.steering_evidence["adult"]["pneumonia"]["n_pos"] == nih_pneumonia["n_pos"]
    assert (
        "collections never trained on (nih), all films outside validation"
        in (Path(train(cfg, progress=False)).parent / "card.md").read_text()
    )
