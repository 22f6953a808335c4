"""The few layers of our own that a saved model needs at inference (registered for loading).

A finding that is a small focal thing (a lung nodule of 5-30 mm is 3-16 px at 224 px) is
scored from a dense map on a fine feature grid rather than from the global average of the
last 7x7 map: averaging over the film dilutes a lesion that fills one cell, and a map trained
with the lesion's position says *where* as well as *whether*.  ``LogMeanExpPool`` turns such a
map into the image's logit, ``FindingLogits`` puts it into its finding's column, and
``PlattCalibration`` holds the per-finding calibration that used to be folded into the Dense
layer (a pooled map logit cannot take that fold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import layers, ops

PACKAGE = "xray_triage"


@keras.saving.register_keras_serializable(package=PACKAGE)
class LogMeanExpPool(layers.Layer):
    """(n, h, w, k) logit maps -> (n, k) image logits: (1/r) log(mean(exp(r * map))).

    A smooth maximum: with ``r`` around 8 one confident cell among hundreds of quiet ones gives
    nearly its own logit (a single nodule decides the film), while early in training, when no
    cell is confident, every cell still gets a gradient.  The log-mean (not log-sum) keeps the
    logit of a uniform map equal to that map's value, whatever the grid size.
    """

    def __init__(self, r: float = 8.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.r = float(r)

    def call(self, maps: Any) -> Any:
        n_cells = ops.cast(ops.shape(maps)[1] * ops.shape(maps)[2], maps.dtype)
        lse = ops.logsumexp(self.r * maps, axis=(1, 2))
        return (lse - ops.log(n_cells)) / self.r

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "r": self.r}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FindingLogits(layers.Layer):
    """[dense logits (n, F), pooled map logits (n, k)] -> (n, F), map j in column ``map_columns[j]``.

    Findings without a map keep the global-average-pooled Dense logit, so Grad-CAM's closed
    form still holds for them.
    """

    def __init__(self, map_columns: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.map_columns = [int(c) for c in map_columns]

    def call(self, inputs: Sequence[Any]) -> Any:
        dense, pooled = inputs
        cols = []
        for c in range(int(dense.shape[-1])):
            if c in self.map_columns:
                j = self.map_columns.index(c)
                cols.append(pooled[:, j : j + 1])
            else:
                cols.append(dense[:, c : c + 1])
        return ops.concatenate(cols, axis=-1)

    def compute_output_shape(self, input_shape: Sequence[Sequence[int | None]]) -> tuple[int | None, ...]:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "map_columns": self.map_columns}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PlattCalibration(layers.Layer):
    """Per-finding ``a * logit + b``, identity while training; set once on validation (Platt)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trainable = False

    def build(self, input_shape: Sequence[int | None]) -> None:
        last = input_shape[-1]
        if last is None:
            raise ValueError("PlattCalibration needs a known number of findings (last axis)")
        n = int(last)
        self.scale = self.add_weight(shape=(n,), initializer="ones", trainable=False, name="scale")
        self.offset = self.add_weight(shape=(n,), initializer="zeros", trainable=False, name="offset")

    def call(self, logits: Any) -> Any:
        return logits * self.scale + self.offset


def prior_logit(p: float) -> float:
    """The logit of a base rate: a head initialised there starts stable under masked labels."""
    return math.log(p / (1.0 - p))
