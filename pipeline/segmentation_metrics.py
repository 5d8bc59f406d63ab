"""Segmentation scores exactly as the FCN reference's score.py computes them, and a Keras metric.

All four numbers come from one confusion matrix `hist` (rows = true class, columns = predicted)
summed over every evaluated pixel whose label is a class (0 <= label < C); 255 (ignore) and any
other value outside the classes never enter it:

- pixel accuracy          acc      = sum(diag) / sum(hist)
- mean class accuracy     acc_cls  = nanmean(diag / hist.sum(1))
- mean IU                 mean_iu  = nanmean(diag / (hist.sum(1) + hist.sum(0) - diag))
- frequency-weighted IU   fwavacc  = sum(freq[freq > 0] * iu[freq > 0]), freq = hist.sum(1) / sum(hist)

A class absent from the ground truth has no class accuracy (NaN, left out of the mean); it has an
IU of 0 if it was predicted somewhere, NaN (left out) if it was not.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

IGNORE_LABEL = 255


def confusion_histogram(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """score.py's `fast_hist`: `[C, C]` int64 counts of (true, predicted) over pixels with a class label.

    Args:
        labels: true class per pixel, any shape; values outside 0..C-1 (255) are left out.
        predictions: predicted class per pixel, same shape.
        num_classes: C.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions must have the same shape; got {labels.size} and "
                         f"{predictions.size} pixels.")
    keep = (labels >= 0) & (labels < num_classes)
    return np.bincount(num_classes * labels[keep] + predictions[keep],
                       minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(hist: np.ndarray) -> dict[str, np.ndarray]:
    """IU and accuracy (recall) per class, NaN where score.py has NaN, and pixel counts."""
    hist = np.asarray(hist, dtype=np.float64)
    diag = np.diag(hist)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = diag / hist.sum(1)
        iu = diag / (hist.sum(1) + hist.sum(0) - diag)
    return {"iu": iu, "accuracy": accuracy, "true_pixels": hist.sum(1), "predicted_pixels": hist.sum(0)}


def segmentation_scores(hist: np.ndarray) -> dict[str, float]:
    """pixel_accuracy, mean_class_accuracy, mean_iu and frequency_weighted_iu of score.py.

    Args:
        hist: `[C, C]` confusion matrix, rows = true class, from `confusion_histogram`.
    """
    hist = np.asarray(hist, dtype=np.float64)
    if hist.sum() == 0:
        raise ValueError("The confusion matrix is empty: no evaluated pixel had a class label.")
    scores = per_class_scores(hist)
    frequency = hist.sum(1) / hist.sum()
    present = frequency > 0
    with np.errstate(invalid="ignore"):
        return {
            "pixel_accuracy": float(np.diag(hist).sum() / hist.sum()),
            "mean_class_accuracy": float(np.nanmean(scores["accuracy"])),
            "mean_iu": float(np.nanmean(scores["iu"])),
            "frequency_weighted_iu": float((frequency[present] * scores["iu"][present]).sum()),
        }


@keras.saving.register_keras_serializable(package="pipeline")
class PixelAccuracy(keras.metrics.Metric):
    """Share of labelled pixels whose argmax is the label; pixels labelled `ignore_class` don't count.

    Keras's `SparseCategoricalAccuracy` has no `ignore_class`, and 255 must count nowhere.

    Args:
        ignore_class: the label to leave out (255).
        name: metric name.
    """

    def __init__(self, ignore_class: int = IGNORE_LABEL, name: str = "pixel_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_class = ignore_class
        self.correct = self.add_variable((), initializer="zeros", name="correct", dtype="float32")
        self.total = self.add_variable((), initializer="zeros", name="total", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(ops.reshape(y_true, ops.shape(y_pred)[:-1]), "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        valid = ops.not_equal(y_true, self.ignore_class)
        hits = ops.logical_and(valid, ops.equal(y_true, predicted))
        self.correct.assign_add(ops.sum(ops.cast(hits, "float32")))
        self.total.assign_add(ops.sum(ops.cast(valid, "float32")))

    def result(self):
        return ops.divide_no_nan(self.correct, self.total)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "ignore_class": self.ignore_class}
