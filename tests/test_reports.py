"""Evaluation reports and TensorBoard extras, read back from disk and checked with scikit-learn."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from pipeline import callbacks, reports
from pipeline.callbacks import LearningRate, Throughput

CLASS_NAMES = ["cat", "dog", "bird", "fish"]
NEVER_PREDICTED = 3  # "fish": present in the labels, never the argmax.
IMAGE_MODES = ["RGB", "L", "RGBA", "P", "CMYK"]


def make_split(directory: Path, count: int = 24, seed: int = 0):
    """Small real images on disk; labels, probabilities with mistakes and a never-predicted class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASS_NAMES)
    logits = rng.normal(size=(count, len(CLASS_NAMES)))
    logits[np.arange(count), labels] += np.where(np.arange(count) % 3 == 0, 0.0, 2.0)
    logits[:, NEVER_PREDICTED] -= 10.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    relative_paths, image_paths = [], []
    for index, label in enumerate(labels):
        mode = IMAGE_MODES[index % len(IMAGE_MODES)]
        extension = "jpg" if mode in ("RGB", "CMYK") else "png"
        relative = f"{CLASS_NAMES[label]}/image_{index:02d}.{extension}"
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(12 + index, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(path)
        relative_paths.append(relative)
        image_paths.append(str(path))
    return labels, probabilities, relative_paths, image_paths


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


def read_events(folder: Path) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, summary value)] over every event file in a TensorBoard run folder."""
    values = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append((event.step, value))
    return values


def scalar(value) -> float:
    return float(tf.make_ndarray(value.tensor))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One report written the way a run writes it: after training, onto an existing metrics.json."""
    root = tmp_path_factory.mktemp("reports")
    labels, probabilities, relative_paths, image_paths = make_split(root / "data")
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"train/loss": 0.5}))
    returned = reports.write_classification_reports(
        run_dir,
        class_names=CLASS_NAMES,
        labels=labels,
        probabilities=probabilities,
        relative_paths=relative_paths,
        image_paths=image_paths,
        split="test",
        top_k=2,
        extra_metrics={"test/loss": np.float32(1.25)},
        tensorboard_dir=run_dir / "tensorboard",
        step=3,
    )
    return {
        "run_dir": run_dir,
        "labels": labels,
        "probabilities": probabilities,
        "relative_paths": relative_paths,
        "image_paths": image_paths,
        "returned": returned,
    }


def test_fixture_has_mistakes_and_a_class_never_predicted(run):
    predicted = run["probabilities"].argmax(axis=1)
    assert NEVER_PREDICTED in run["labels"] and NEVER_PREDICTED not in predicted
    assert 0 < np.sum(predicted != run["labels"]) < len(predicted)


def test_confusion_matrix_csv_equals_sklearn_on_predictions_csv(run):
    rows = read_csv(run["run_dir"] / "confusion_matrix.csv")
    assert rows[0][1:] == CLASS_NAMES and [row[0] for row in rows[1:]] == CLASS_NAMES
    written = np.array([[int(cell) for cell in row[1:]] for row in rows[1:]])

    predictions = read_csv(run["run_dir"] / "predictions.csv")[1:]
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    true = [index[row[1]] for row in predictions]
    predicted = [index[row[2]] for row in predictions]
    expected = confusion_matrix(true, predicted, labels=range(len(CLASS_NAMES)))
    np.testing.assert_array_equal(written, expected)
    assert written[:, NEVER_PREDICTED].sum() == 0


def test_per_class_metrics_equal_sklearn(run):
    rows = {row[0]: row[1:] for row in read_csv(run["run_dir"] / "per_class_metrics.csv")[1:]}
    labels, predicted = run["labels"], run["probabilities"].argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(CLASS_NAMES)), zero_division=0
    )
    for i, name in enumerate(CLASS_NAMES):
        written = [float(value) for value in rows[name]]
        np.testing.assert_allclose(written, [precision[i], recall[i], f1[i], support[i]], atol=1e-6)
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(
            labels, predicted, average=average, zero_division=0
        )
        written = [float(value) for value in rows[f"{average} avg"][:3]]
        np.testing.assert_allclose(written, expected[:3], atol=1e-6)
    assert rows["fish"][:3] == ["0.000000"] * 3


def test_per_class_metrics_of_an_absent_class_are_zero_without_warnings():
    labels = np.array([0, 0, 1, 1, 1])
    predicted = np.array([0, 1, 1, 1, 0])  # Class 2 neither occurs nor is predicted.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matrix = reports.compute_confusion_matrix(labels, predicted, num_classes=3)
        per_class = reports.compute_per_class_metrics(matrix)
    assert [per_class[key][2] for key in ("precision", "recall", "f1", "support")] == [0, 0, 0, 0]
    expected = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    assert per_class["averages"]["macro_f1"] == pytest.approx(expected[2])


def test_top_k_accuracy_equals_sklearn(run):
    expected = top_k_accuracy_score(
        run["labels"], run["probabilities"], k=2, labels=range(len(CLASS_NAMES))
    )
    assert run["returned"]["test/top_2_accuracy"] == pytest.approx(expected)
    predicted = run["probabilities"].argmax(axis=1)
    assert run["returned"]["test/accuracy"] == pytest.approx(np.mean(predicted == run["labels"]))


def test_top_k_is_clamped_to_the_number_of_classes(run, tmp_path):
    metrics = reports.write_classification_reports(
        tmp_path,
        class_names=CLASS_NAMES,
        labels=run["labels"],
        probabilities=run["probabilities"],
        relative_paths=run["relative_paths"],
        top_k=5,
    )
    assert metrics["test/top_4_accuracy"] == 1.0
    assert not (tmp_path / "predictions.png").exists()  # No image_paths, no grid.


def test_predictions_csv_lists_mistakes_first(run):
    rows = read_csv(run["run_dir"] / "predictions.csv")
    assert rows[0] == ["relative_path", "true_class", "predicted_class", "probability", "correct"]
    rows = rows[1:]
    correct = [row[4] for row in rows]
    mistakes = correct.count("false")
    assert correct == ["false"] * mistakes + ["true"] * (len(rows) - mistakes)
    assert all((row[1] != row[2]) == (row[4] == "false") for row in rows)
    confidences = [float(row[3]) for row in rows[:mistakes]]
    assert confidences == sorted(confidences, reverse=True)
    order = {path: i for i, path in enumerate(run["relative_paths"])}
    right = [order[row[0]] for row in rows[mistakes:]]
    assert right == sorted(right)  # The correct ones stay in input order.
    assert sorted(row[0] for row in rows) == sorted(run["relative_paths"])


def test_metrics_json_merge_keeps_earlier_keys(run):
    path = run["run_dir"] / "metrics.json"
    metrics = json.loads(path.read_text())
    assert metrics["train/loss"] == 0.5  # Written before the report.
    assert metrics["test/loss"] == 1.25 and run["returned"]["test/loss"] == 1.25
    for key in ("accuracy", "top_2_accuracy", "mean_class_accuracy", "macro_f1"):
        assert metrics[f"test/{key}"] == pytest.approx(run["returned"][f"test/{key}"])
    assert metrics["test/examples"] == len(run["labels"])
    assert metrics["backend"] == "tensorflow", "in the same write as the metrics, not a second one a kill can cut off"

    reports.merge_metrics_json(path, {"validation/accuracy": 0.75})
    merged = json.loads(path.read_text())
    assert merged == {**metrics, "validation/accuracy": 0.75}


@pytest.mark.parametrize("name", ["confusion_matrix.png", "predictions.png"])
def test_pngs_open_with_pillow(run, name):
    with Image.open(run["run_dir"] / name) as image:
        assert image.format == "PNG" and min(image.size) > 100
        image.load()


def test_unreadable_image_becomes_a_grey_tile(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert reports.load_thumbnail(broken, size=16).shape == (16, 16, 3)


def test_tensorboard_holds_the_images_and_scalars(run):
    events = read_events(run["run_dir"] / "tensorboard" / "test")
    for tag in ("confusion_matrix", "predictions"):
        (step, value), = events[tag]
        assert step == 3 and value.metadata.plugin_data.plugin_name == "images"
        encoded = value.tensor.string_val[2]  # [width, height, png] per tf.summary.image.
        with Image.open(io.BytesIO(encoded)) as image:
            assert image.format == "PNG"
    assert scalar(events["test/accuracy"][0][1]) == pytest.approx(run["returned"]["test/accuracy"])
    assert scalar(events["test/loss"][0][1]) == pytest.approx(1.25)


def test_write_skipped_files(tmp_path):
    reports.write_skipped_files(tmp_path, [])
    assert (tmp_path / "skipped_files.txt").read_text() == ""
    skipped = [("cat/a.jpg", "cannot identify image"), ("dog/b.png", "empty\nfile")]
    reports.write_skipped_files(tmp_path, skipped)
    expected = "cat/a.jpg\tcannot identify image\ndog/b.png\tempty file\n"
    assert (tmp_path / "skipped_files.txt").read_text() == expected


def test_mismatched_inputs_raise_value_error(run, tmp_path):
    with pytest.raises(ValueError, match=r"shape \[examples, classes\]"):
        reports.write_classification_reports(
            tmp_path,
            class_names=CLASS_NAMES[:3],
            labels=run["labels"],
            probabilities=run["probabilities"],
            relative_paths=run["relative_paths"],
        )
    assert not list(tmp_path.iterdir())


def test_throughput_counts_steps_run_over_training_time(monkeypatch):
    clock = iter([10.0, 12.0])  # Epoch start, start of validation.
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    throughput = Throughput(batch_size=4)
    throughput.on_epoch_begin(0)
    for step in (0, 1, 2):
        throughput.on_train_batch_end(step)
    throughput.on_test_begin()
    logs = {"loss": 1.0}
    throughput.on_epoch_end(0, logs)
    assert logs["images_per_second"] == 3 * 4 / 2.0


def test_fit_writes_images_per_second_and_learning_rate(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype("float32")
    y = rng.integers(0, 3, size=40)
    inputs = keras.Input((8,), name="features")
    outputs = keras.layers.Dense(3, activation="softmax", name="class_scores")(inputs)
    model = keras.Model(inputs, outputs)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="sparse_categorical_crossentropy")
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=(x[:8], y[:8]),
        verbose=0,
        callbacks=[
            Throughput(batch_size=8),
            keras.callbacks.TensorBoard(tmp_path / "tensorboard"),
            # After TensorBoard on purpose: TensorBoard must write learning_rate by itself.
            LearningRate(),
            keras.callbacks.CSVLogger(tmp_path / "epochs.csv"),
        ],
    )
    events = read_events(tmp_path / "tensorboard" / "train")
    assert [step for step, _ in events["epoch_images_per_second"]] == [0, 1]
    assert all(scalar(value) > 0 for _, value in events["epoch_images_per_second"])
    # 5 steps per epoch; the schedule halves the rate every step.
    learning_rates = [scalar(value) for _, value in events["epoch_learning_rate"]]
    np.testing.assert_allclose(learning_rates, [0.1 * 0.5**5, 0.1 * 0.5**10], rtol=1e-5)
    assert "epoch_images_per_second" not in read_events(tmp_path / "tensorboard" / "validation")

    rows = read_csv(tmp_path / "epochs.csv")
    header = rows[0]
    assert {"images_per_second", "learning_rate"} <= set(header)
    logged = [float(row[header.index("learning_rate")]) for row in rows[1:]]
    np.testing.assert_allclose(logged, learning_rates)
    assert len(history.history["images_per_second"]) == 2


def test_checkpoint_keeps_best_at_its_epoch_while_last_moves_on(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(inputs))
    model.compile("sgd", "mse")
    checkpoint = callbacks.Checkpoint(str(tmp_path), monitor="val_loss")
    checkpoint.set_model(model)

    def epoch(val_loss: float, bias: float) -> None:
        model.get_layer("dense").bias.assign([bias])
        checkpoint.on_epoch_end(0, {"loss": 1.0, "val_loss": val_loss})

    def saved_bias(name: str) -> float:
        loaded = keras.saving.load_model(tmp_path / name)
        return float(keras.ops.convert_to_numpy(loaded.get_layer("dense").bias)[0])

    epoch(val_loss=0.5, bias=1.0)
    epoch(val_loss=0.2, bias=2.0)  # the best epoch
    epoch(val_loss=0.9, bias=3.0)
    assert saved_bias("last.keras") == 3.0
    assert saved_bias("best.keras") == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "last.keras"]  # no temporary left


def test_pixel_confusion_matrix_shows_row_percentages_that_fit_and_the_csv_keeps_counts(tmp_path):
    from pipeline.segmentation_reports import write_segmentation_reports

    hist = np.array([[95391, 15334, 0], [1229, 90662, 3], [0, 0, 0]])
    names = ["background", "person", "chair"]
    figure = reports.plot_confusion_matrix(hist, names, cell_values="percent")
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts == ["86", "14", "", "1", "99", "<1", "", "", ""]
    write_segmentation_reports(tmp_path, class_names=names, hist=hist)
    rows = read_csv(tmp_path / "confusion_matrix.csv")
    assert [[int(value) for value in row[1:]] for row in rows[1:]] == hist.tolist()
    with Image.open(tmp_path / "confusion_matrix.png") as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="cell_values must be 'counts' or 'percent'"):
        reports.plot_confusion_matrix(hist, names, cell_values="fractions")
