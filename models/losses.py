"""The losses our models are trained with, registered so a saved training checkpoint loads.

Each dataset labels only some findings, so the losses mask what a film's label does not say
instead of inventing negatives.  They live with the models (not with training) because a
``.keras`` file saved with its compile configuration names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="xray_triage")
class MaskedBinaryCrossentropy(keras.losses.Loss):
    """BCE over the findings a dataset labels; unlabelled (-1) entries contribute nothing.

    Each dataset labels only some findings, so a plain BCE would need invented negatives.
    ``class_weights`` is (n_findings, 2) [neg, pos] to balance rare positives.
    """

    def __init__(
        self, class_weights: Sequence[Sequence[float]] | None = None, name: str = "masked_bce", **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.class_weights = None if class_weights is None else [list(map(float, w)) for w in class_weights]

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.clip(ops.cast(y_pred, "float32"), 1e-6, 1.0 - 1e-6)
        mask = ops.cast(ops.greater_equal(y_true, 0.0), "float32")
        t = ops.clip(y_true, 0.0, 1.0)
        bce = -(t * ops.log(y_pred) + (1.0 - t) * ops.log(1.0 - y_pred))
        if self.class_weights is not None:
            cw = ops.convert_to_tensor(np.asarray(self.class_weights, dtype="float32"))
            w = t * cw[:, 1] + (1.0 - t) * cw[:, 0]
            bce = bce * w
        per_sample = ops.sum(bce * mask, axis=-1)
        # Keras averages over the batch; rescale so the result is the mean over *labelled* entries,
        # otherwise batches rich in partially-labelled images would get smaller gradients.
        batch = ops.cast(ops.shape(mask)[0], "float32")
        return per_sample * batch / ops.maximum(ops.sum(mask), 1.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_weights": self.class_weights}


@keras.saving.register_keras_serializable(package="xray_triage")
class MaskedMapLoss(keras.losses.Loss):
    """Cell-wise BCE on dense finding maps, positives and negatives balanced within each film.

    ``y_true`` is (n, h, w, 2k): k 0/1 targets then k weights (``TrainingTransform``);
    ``y_pred`` is (n, h, w, k) logits.  A nodule covers 1-20 of the 784 cells at stride 8, so
    an unweighted mean would teach "always no"; here each film's loss is the mean over its
    positive cells plus the mean over its negative cells.
    """

    def __init__(self, name: str = "masked_map_bce", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        z = ops.cast(y_pred, "float32")
        k = ops.shape(z)[-1]
        y_true = ops.cast(y_true, "float32")
        t, w = y_true[..., :k], y_true[..., k:]
        bce = ops.maximum(z, 0.0) - z * t + ops.log1p(ops.exp(-ops.abs(z)))
        pos, neg = t * w, (1.0 - t) * w
        axes = (1, 2)
        pos_mean = ops.sum(bce * pos, axis=axes) / ops.maximum(ops.sum(pos, axis=axes), 1.0)
        neg_mean = ops.sum(bce * neg, axis=axes) / ops.maximum(ops.sum(neg, axis=axes), 1.0)
        return ops.sum(pos_mean + neg_mean, axis=-1)
