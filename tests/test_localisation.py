"""The synthetic-nodule localisation figure, with heatmap functions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.pixels import to_model_tensor
from models.card_sections import render_localisation
from models.findings import FINDING_NAMES
from tests.conftest import shared_file
from training.localisation import synthetic_localisation

MASS = FINDING_NAMES.index("mass")


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    names = sorted(p.name for p in shared_file("adult-normals-rsna", "images").iterdir())[:6]
    return np.stack([to_model_tensor(shared_file("adult-normals-rsna", "images", n)) for n in names])


class Oracle:
    """Knows the films without nodules: its mass map is exactly what was added to the film."""

    def __init__(self, normals: np.ndarray, point: tuple[int, int] | None = None) -> None:
        self.normals = normals
        self.point = point  # a fixed (row, col) instead: a map that always points at one place

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        diff = np.abs(batch[..., 0] - self._match(batch))
        maps = np.zeros((len(batch), len(FINDING_NAMES), *batch.shape[1:3]), dtype=np.float32)
        if self.point is None:
            maps[:, MASS] = diff
        else:
            maps[:, MASS, self.point[0], self.point[1]] = 1.0
        probs = np.zeros((len(batch), len(FINDING_NAMES)), dtype=np.float32)
        probs[:, MASS] = diff.reshape(len(batch), -1).sum(axis=1)
        return maps, probs

    def _match(self, batch: np.ndarray) -> np.ndarray:
        """The original film of each image: the one it differs least from."""
        d = np.abs(batch[:, None, ..., 0] - self.normals[None, ..., 0]).reshape(len(batch), len(self.normals), -1)
        return self.normals[np.argmin(d.mean(axis=2), axis=1), ..., 0]


def test_a_map_of_the_nodule_itself_is_always_inside(normals):
    loc = synthetic_localisation(Oracle(normals), normals, seed=3, n_boot=50)
    assert loc["n"] == len(normals)  # every real normal had room in its lungs
    assert loc["share_max_inside_nodule"] == 1.0
    assert loc["share_max_within_tolerance"] == 1.0
    assert loc["detection_auc_paired"] == 1.0
    assert 5.0 <= loc["diameter_mm_range"][0] <= loc["diameter_mm_range"][1] <= 40.0


def test_a_map_that_points_at_a_corner_never_hits(normals):
    loc = synthetic_localisation(Oracle(normals, point=(0, 0)), normals, seed=3, n_boot=50)
    assert loc["share_max_inside_nodule"] == 0.0
    assert loc["share_max_within_tolerance"] == 0.0
    assert loc["median_distance_px"] > 40
    lines = "\n".join(render_localisation(loc))
    assert "0.0%" in lines and "7x7 feature grid" in lines


def test_seeded(normals):
    a = synthetic_localisation(Oracle(normals), normals, seed=9, n_boot=20)
    b = synthetic_localisation(Oracle(normals), normals, seed=9, n_boot=20)
    assert a == b
