"""Segmentation reports: per-class IoU table, confusion matrix, overlays, metrics.json, TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.files import atomic_write_bytes, atomic_write_text
from pipeline.reports import (_csv_text, format_confusion_matrix_csv, log_metrics_by_split, log_to_tensorboard,
                              merge_metrics_json, plot_confusion_matrix, render_png, run_facts)
from pipeline.segmentation import IGNORE_LABEL, voc_colormap
from pipeline.segmentation_metrics import per_class_scores, segmentation_scores

OVERLAY_SIDE = 320  # longest side of each overlay tile, in pixels
OVERLAY_ALPHA = 0.55  # weight of the class colour over the photo


def write_segmentation_reports(
    run_dir: str | Path,
    *,
    class_names: list[str],
    hist: np.ndarray,
    examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = (),
    split: str = "test",
    extra_metrics: dict | None = None,
    tensorboard_dir: str | Path | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Writes the reports of one evaluated split and returns its metrics (`{split}/mean_iu`, ...).

    Files in `run_dir`, each written atomically: `per_class_iou.csv`, `confusion_matrix.csv`,
    `confusion_matrix.png` (% of each true class's pixels), `predictions.png` (image / ground truth / prediction
    overlays with the colour legend) and `metrics.json` last (merged with earlier keys).

    Args:
        run_dir: the run folder.
        class_names: C names, label order.
        hist: `[C, C]` pixel confusion matrix at the original resolution, rows = true class.
        examples: (name, uint8 RGB image, true mask, predicted mask) to draw, in display order.
        split: metric key prefix.
        extra_metrics: more numbers to store (loss, validation metrics), as given.
        tensorboard_dir: if given, the scalars and both images go to `tensorboard_dir/{split}`.
        step: TensorBoard step.
    """
    run_dir = Path(run_dir)
    hist = np.asarray(hist, dtype=np.int64)
    if hist.shape != (len(class_names), len(class_names)):
        raise ValueError(f"hist must be [{len(class_names)}, {len(class_names)}] for the class names; "
                         f"got {hist.shape}.")
    metrics = {f"{split}/{name}": value for name, value in segmentation_scores(hist).items()}
    metrics[f"{split}/pixels"] = int(hist.sum())
    metrics.update(extra_metrics or {})

    atomic_write_text(run_dir / "per_class_iou.csv", format_per_class_iou_csv(hist, class_names))
    atomic_write_text(run_dir / "confusion_matrix.csv", format_confusion_matrix_csv(hist, class_names))
    # Pixel counts have five or more digits: the picture shows percentages, the CSV the counts.
    images = {"confusion_matrix": render_png(plot_confusion_matrix(
        hist, class_names, title=f"{split} pixels: % of each true class (counts in confusion_matrix.csv)",
        cell_values="percent"))}
    atomic_write_bytes(run_dir / "confusion_matrix.png", images["confusion_matrix"])
    if examples:
        images["predictions"] = render_png(plot_overlays(examples, class_names))
        atomic_write_bytes(run_dir / "predictions.png", images["predictions"])
    merge_metrics_json(run_dir / "metrics.json", {**metrics, **run_facts()})
    if tensorboard_dir is not None:
        log_to_tensorboard(Path(tensorboard_dir) / split, images=images, scalars={}, step=step)
        log_metrics_by_split(tensorboard_dir, metrics, step=step)
    return metrics


def format_per_class_iou_csv(hist: np.ndarray, class_names: list[str]) -> str:
    """CSV text: class, iou, accuracy, true_pixels, predicted_pixels; then a `mean` row.

    IU and accuracy are empty where score.py has NaN (class neither labelled nor predicted, or not
    labelled), and those classes are left out of the means, as in score.py.
    """
    scores = per_class_scores(hist)
    text = lambda value: "" if np.isnan(value) else f"{value:.6f}"  # noqa: E731
    rows = [["class", "iou", "accuracy", "true_pixels", "predicted_pixels"]]
    for index, name in enumerate(class_names):
        rows.append([name, text(scores["iu"][index]), text(scores["accuracy"][index]),
                     int(scores["true_pixels"][index]), int(scores["predicted_pixels"][index])])
    summary = segmentation_scores(hist)
    rows.append(["mean", text(summary["mean_iu"]), text(summary["mean_class_accuracy"]),
                 int(scores["true_pixels"].sum()), int(scores["predicted_pixels"].sum())])
    return _csv_text(rows)


def colourise(mask: np.ndarray, image: np.ndarray | None = None, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB picture of a class mask in VOC colours (255 = ignore in VOC's cream), over `image` if given.

    Background (0) shows the photo unchanged; other classes blend their colour with weight `alpha`.
    """
    colours = voc_colormap()[np.asarray(mask, dtype=np.uint8)]
    if image is None:
        return colours
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.where(np.asarray(mask)[..., None] == 0, image, blended.round().astype(np.uint8))


def _thumbnail(array: np.ndarray, side: int = OVERLAY_SIDE) -> np.ndarray:
    """Nearest-neighbour downscale so the longest side is at most `side` (no new colours in masks)."""
    step = max(1, math.ceil(max(array.shape[:2]) / side))
    return array[::step, ::step]


def plot_overlays(examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], class_names: list[str]) -> Figure:
    """One row per example: the image, the ground truth and the prediction over it; a class legend.

    Args:
        examples: (name, uint8 RGB image, true mask, predicted mask).
        class_names: C names; the legend lists the classes that appear in the drawn masks.
    """
    rows = len(examples)
    figure = Figure(figsize=(10.5, 2.7 * rows + 0.5))
    shown = set()
    for row, (name, image, truth, predicted) in enumerate(examples):
        truth, predicted = np.asarray(truth), np.asarray(predicted)
        shown |= set(np.unique(truth).tolist()) | set(np.unique(predicted).tolist())
        pictures = (image, colourise(truth, image), colourise(predicted, image))
        titles = (str(name), "ground truth", "prediction")
        for column, (picture, title) in enumerate(zip(pictures, titles)):
            axes = figure.add_subplot(rows, 3, row * 3 + column + 1)
            axes.imshow(_thumbnail(picture), interpolation="nearest")
            axes.set_title(title, fontsize=9)
            axes.set_xticks([])
            axes.set_yticks([])
    colours = voc_colormap() / 255.0
    handles = [Patch(facecolor=colours[index], edgecolor="grey", label=class_names[index])
               for index in sorted(shown) if index < len(class_names)]
    if IGNORE_LABEL in shown:
        handles.append(Patch(facecolor=colours[IGNORE_LABEL], edgecolor="grey", label="ignore (255)"))
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / (2.7 * rows + 0.5), bottom=0.5 / (2.7 * rows + 0.5),
                           wspace=0.03, hspace=0.15)
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    return figure
