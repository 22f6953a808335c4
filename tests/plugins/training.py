"""Fixtures for the training/model suites: real records and one tiny model trained on real images.

The tiny model is trained once per session (a few steps on a few dozen real images) because
saving, reloading, predicting, evaluating and Grad-CAM all need a trained model, and CI must
never run the full training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA


def _need_data() -> Path:
    if not (SHARED_DATA / "kermany").is_dir():
        pytest.skip(f"real data not found: {SHARED_DATA} (../shared/data must sit beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_records() -> list:
    from training.readers import read_shared_data

    return read_shared_data(_need_data())


def tiny_config(tmp: Path, name: str = "tiny", **train: object) -> object:
    from training.train import TrainConfig

    hp = {"batch_size": 8, "epochs": 2, "steps_per_epoch": 2, "patience": 5, "bootstrap": 50, **train}
    return TrainConfig(
        name=name,
        version="0.0.1",
        seed=11,
        data={"root": str(_need_data()), "limit_per_source": 14},
        model={"arch": "compact_cnn", "internal_size": 64, "width": 0.25},
        augment={},
        train=hp,
        run_dir=str(tmp / "run"),
        output=str(tmp / "out"),
        cache_dir=None,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/<tiny>/ with model.keras, card.json, card.md, split.csv, history.csv."""
    from training.train import train

    tmp = tmp_path_factory.mktemp("tiny-train")
    model_file = train(tiny_config(tmp), resume=False, progress=False)
    return Path(model_file).parent


@pytest.fixture(scope="session")
def tiny_map_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose mass score comes from a dense map, trained with synthetic nodules."""
    from training.train import train

    tmp = tmp_path_factory.mktemp("tiny-map-train")
    cfg = tiny_config(tmp, name="tinymap", localisation_images=8)
    cfg.model = {**cfg.model, "internal_size": 128, "map_findings": ["mass"]}
    cfg.augment = {"geometry": "cpu"}
    cfg.synthetic_nodules = {"probability": 0.5}
    model_file = train(cfg, resume=False, progress=False)
    return Path(model_file).parent


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> object:
    from models.registry import TriageModel

    return TriageModel.load(tiny_model_dir)
