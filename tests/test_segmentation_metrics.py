"""Segmentation metrics: score.py's definitions on hand-checked cases, 255 ignored everywhere, reports."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest

from pipeline.segmentation_metrics import (PixelAccuracy, confusion_histogram, per_class_scores,
                                           segmentation_scores)
from pipeline.segmentation_reports import colourise, write_segmentation_reports


def score_py(hist: np.ndarray) -> tuple[float, float, float, float]:
    """The FCN reference's score.py, verbatim in numpy, from a confusion matrix."""
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        acc_cls = np.nanmean(np.diag(hist) / hist.sum(1))
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        mean_iu = np.nanmean(iu)
        freq = hist.sum(1) / hist.sum()
        fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
    return acc, acc_cls, mean_iu, fwavacc


def as_tuple(scores: dict) -> tuple:
    return tuple(scores[k] for k in ("pixel_accuracy", "mean_class_accuracy", "mean_iu", "frequency_weighted_iu"))


def test_hand_checked_three_class_case_with_an_ignored_pixel():
    labels = np.array([[0, 0, 1], [1, 2, 255]])
    predicted = np.array([[0, 1, 1], [1, 0, 2]])
    hist = confusion_histogram(labels, predicted, 3)
    np.testing.assert_array_equal(hist, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])  # the 255 pixel counts nowhere
    # acc 3/5; class accuracies 1/2, 1, 0; IU 1/3, 2/3, 0; frequencies 2/5, 2/5, 1/5.
    expected = (0.6, 0.5, 1 / 3, 0.4 * 1 / 3 + 0.4 * 2 / 3)
    np.testing.assert_allclose(as_tuple(segmentation_scores(hist)), expected)
    np.testing.assert_allclose(as_tuple(segmentation_scores(hist)), score_py(hist.astype(float)))


def test_absent_classes_follow_score_py_nan_rules():
    # Class 2: predicted but never labelled -> IU 0 (counted), accuracy NaN (left out).
    # Class 3: neither labelled nor predicted -> IU NaN and accuracy NaN (both left out).
    labels = np.array([0, 0, 0, 1, 1, 1])
    predicted = np.array([0, 0, 2, 1, 1, 0])
    hist = confusion_histogram(labels, predicted, 4)
    per_class = per_class_scores(hist)
    np.testing.assert_allclose(per_class["iu"][:3], [2 / 4, 2 / 3, 0.0])
    assert np.isnan(per_class["iu"][3]) and np.isnan(per_class["accuracy"][2:]).all()
    scores = segmentation_scores(hist)
    assert scores["mean_iu"] == pytest.approx((2 / 4 + 2 / 3 + 0) / 3)
    assert scores["mean_class_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert scores["frequency_weighted_iu"] == pytest.approx(0.5 * 2 / 4 + 0.5 * 2 / 3)
    np.testing.assert_allclose(as_tuple(scores), score_py(hist.astype(float)))


def test_random_cases_equal_score_py_and_only_labels_in_range_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        classes = int(rng.integers(2, 8))
        labels = rng.integers(0, classes, size=(3, 17, 11))
        labels[rng.random(labels.shape) < 0.2] = 255
        predicted = rng.integers(0, classes, size=labels.shape)
        hist = confusion_histogram(labels, predicted, classes)
        assert hist.sum() == np.count_nonzero(labels != 255)
        np.testing.assert_allclose(as_tuple(segmentation_scores(hist)), score_py(hist.astype(float)))
    with pytest.raises(ValueError, match="empty"):
        segmentation_scores(np.zeros((3, 3)))


def test_keras_loss_and_metrics_ignore_255_exactly_as_the_confusion_matrix():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(2, 9, 13))
    labels[rng.random(labels.shape) < 0.3] = 255
    probabilities = rng.dirichlet(np.ones(4), size=labels.shape).astype("float32")
    hist = confusion_histogram(labels, probabilities.argmax(-1), 4)
    scores = segmentation_scores(hist)

    accuracy = PixelAccuracy()
    accuracy.update_state(labels, probabilities)
    assert float(accuracy.result()) == pytest.approx(scores["pixel_accuracy"], abs=1e-6)
    mean_iu = keras.metrics.MeanIoU(4, ignore_class=255, sparse_y_pred=False)
    mean_iu.update_state(labels, probabilities)
    assert float(mean_iu.result()) == pytest.approx(scores["mean_iu"], abs=1e-6)

    valid = labels != 255
    expected = -np.log(probabilities[valid, labels[valid]]).mean()
    loss = keras.losses.SparseCategoricalCrossentropy(ignore_class=255)(labels, probabilities)
    assert float(loss) == pytest.approx(expected, rel=1e-5), "mean over labelled pixels only"
    assert float(keras.losses.SparseCategoricalCrossentropy(ignore_class=255)(
        np.full((1, 2), 255), probabilities[:1, 0, :2])) == 0.0, "an all-ignore batch adds no loss (no NaN)"


def test_reports_write_the_iou_table_confusion_matrix_overlays_and_metrics(tmp_path):
    names = ["background", "cat", "dog"]
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 0]], dtype=np.uint8)
    predicted = np.array([[0, 1, 1, 1], [2, 0, 0, 0]])
    hist = confusion_histogram(labels, predicted, 3)
    image = np.full((2, 4, 3), 200, dtype=np.uint8)
    metrics = write_segmentation_reports(tmp_path, class_names=names, hist=hist,
                                         examples=[("one", image, labels, predicted)],
                                         extra_metrics={"test/loss": 0.5}, tensorboard_dir=tmp_path / "tb")
    assert metrics["test/mean_iu"] == pytest.approx(score_py(hist.astype(float))[2])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/pixel_accuracy"] == pytest.approx(5 / 7) and saved["backend"] == "tensorflow"
    with open(tmp_path / "per_class_iou.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["class"] for row in rows] == [*names, "mean"]
    assert float(rows[1]["iou"]) == pytest.approx(2 / 3) and rows[1]["true_pixels"] == "2"
    with open(tmp_path / "confusion_matrix.csv", newline="") as file:
        table = list(csv.reader(file))
    np.testing.assert_array_equal(np.array([row[1:] for row in table[1:]], dtype=int), hist)
    for name in ("confusion_matrix.png", "predictions.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb" / "test").glob("events.out.tfevents.*"))
    overlay = colourise(labels, image)
    assert (overlay[0, 0] == 200).all() and not (overlay[0, 2] == 200).all(), "background shows the photo"
