"""Recipe pieces of training that need no model: batch pools, checkpoint choice, operating points."""

from __future__ import annotations

from collections import Counter

import numpy as np

from models.findings import FINDING_NAMES
from training.dataset import BalancedBatches
from training.train import TrainConfig, batch_groups, population_thresholds, within_source_aucs

P = FINDING_NAMES.index("pneumonia")


def test_source_fractions_give_every_collection_its_share(shared_records):
    cfg = TrainConfig(
        name="t",
        train={"source_fractions": {"kermany": 0.5, "rsna-normals": 0.3}, "other_fraction": 0.2},
    )
    groups, fractions = batch_groups(shared_records, cfg)
    assert fractions == {"kermany": 0.5, "rsna-normals": 0.3, "other": 0.2}
    assert Counter(groups)["other"] == len(shared_records) - 5216 - 6000
    y = np.zeros((len(shared_records), len(FINDING_NAMES)), dtype=np.float32)
    seq = BalancedBatches(np.zeros((len(shared_records), 1, 1, 1)), y, groups, 100, 20, fractions, seed=1)
    drawn = Counter(groups[i] for i in seq._order)
    assert 0.45 < drawn["kermany"] / 2000 < 0.55 and 0.25 < drawn["rsna-normals"] / 2000 < 0.35


def test_without_source_fractions_batches_mix_adults_and_children(shared_records):
    groups, fractions = batch_groups(shared_records, TrainConfig(name="t", train={"adult_fraction": 0.4}))
    assert fractions == {"adult": 0.4, "paediatric": 0.6}
    assert Counter(groups)["paediatric"] == sum(r.population == "paediatric" for r in shared_records) > 5216


def test_checkpoint_choice_ignores_a_collection_shortcut():
    """Scores that only say which collection an image is from: pooled AUC high, within-source 0.5."""
    rng = np.random.default_rng(0)
    n = 200
    sources = np.array(["a"] * n + ["b"] * n)
    y = np.full((2 * n, len(FINDING_NAMES)), -1, dtype=np.int8)
    y[:n, P] = (rng.random(n) < 0.8).astype(int)  # collection a: mostly positive
    y[n:, P] = (rng.random(n) < 0.2).astype(int)  # collection b: mostly negative
    p = np.zeros(y.shape, dtype=np.float32)
    p[:, P] = np.where(sources == "a", 0.9, 0.1) + rng.normal(0, 1e-3, 2 * n)
    within = within_source_aucs(y, p, sources)
    assert set(within) == {"a/pneumonia", "b/pneumonia"}
    assert all(abs(v - 0.5) < 0.15 for v in within.values())
    # a source with only one class, or too few of one, is left out
    assert within_source_aucs(y[:n][y[:n, P] == 1], p[:n][y[:n, P] == 1], sources[:n][y[:n, P] == 1]) == {}


def test_operating_points_per_population():
    """Children and adults each get the threshold for 95 % sensitivity on their own positives."""
    rng = np.random.default_rng(1)
    n = 400
    pops = ["adult"] * n + ["paediatric"] * n
    y = np.full((2 * n, len(FINDING_NAMES)), -1, dtype=np.int8)
    y[:, P] = rng.integers(0, 2, 2 * n)
    p = np.zeros(y.shape, dtype=np.float32)
    # children's positives score much higher than adults' positives
    p[:n, P] = np.where(y[:n, P] == 1, rng.uniform(0.3, 0.6, n), rng.uniform(0.0, 0.4, n))
    p[n:, P] = np.where(y[n:, P] == 1, rng.uniform(0.7, 1.0, n), rng.uniform(0.0, 0.5, n))
    th = population_thresholds(y, p, pops, 0.95)
    assert set(th) == {"adult", "paediatric"}
    for pop, sl in (("adult", slice(0, n)), ("paediatric", slice(n, 2 * n))):
        pos = p[sl, P][y[sl, P] == 1]
        assert (pos >= th[pop]["pneumonia"]).mean() >= 0.95
    assert th["paediatric"]["pneumonia"] > th["adult"]["pneumonia"] + 0.2
    # mass has no positives anywhere: both fall back to the pooled (default) rule
    assert th["adult"]["mass"] == th["paediatric"]["mass"] == 0.5
