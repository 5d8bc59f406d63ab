"""annotate.py: the classifier recast as convolutions equals the dense one, and maps classes onto the image."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from pipeline.annotate import (Annotation, annotate, fully_convolutional, plot_annotation, recast, upsample_scores,
                               working_size)
from pipeline.data import decode_error
from pipeline.importers.convert import copy_matching_layers
from pipeline.layers import ImagePreprocessing
from tests.conftest import CONF, compose_config

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent


def compose_annotate(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="annotate", overrides=[
            f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *overrides])


def test_recast_vgg16_equals_the_dense_vgg16_at_224_and_maps_larger_images(tmp_path):
    keras.utils.set_random_seed(0)
    backbone = instantiate(compose_config(["backbone=vgg16", "backbone.weights=null"], tmp_path).backbone)
    classifier = backbone.build(include_top=True)  # random weights are enough
    base = backbone.build([None, None])
    copy_matching_layers(classifier, base)
    network = recast(classifier, base, backbone.feature_layer, backbone.preprocessing)
    assert network.window == 7 and network.minimum_side == 224
    assert network.model.get_layer("fc1_conv").kernel.shape == (7, 7, 512, 4096)
    assert network.model.get_layer("fc2_conv").kernel.shape == (1, 1, 4096, 4096)
    assert network.model.get_layer("predictions_conv").kernel.shape == (1, 1, 4096, 1000)

    images = np.stack([skimage_data.chelsea()[:224, :224], skimage_data.coffee()[:224, :224]]).astype(np.float32)
    # One pass through each: the dense model's logits and probabilities, the recast model's.
    dense = keras.Model(classifier.input, [classifier.get_layer("fc2").output, classifier.output])
    fc7, probabilities = (np.asarray(output) for output in dense(ImagePreprocessing("caffe")(images)))
    kernel, bias = classifier.get_layer("predictions").get_weights()
    logits = fc7 @ kernel + bias
    probe = keras.Model(network.model.input, [network.model.get_layer("predictions_conv").output,
                                              network.model.output])
    recast_logits, recast_probabilities = (np.asarray(output) for output in probe(images))
    assert recast_logits.shape == recast_probabilities.shape == (2, 1, 1, 1000)
    np.testing.assert_allclose(recast_logits[:, 0, 0], logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    np.testing.assert_allclose(recast_probabilities[:, 0, 0], probabilities, atol=1e-6)

    # 320x416: 10x13 pool5 cells, a 7x7 fc6 window leaves 4x7 positions.
    larger = np.random.default_rng(0).uniform(0, 255, (1, 320, 416, 3)).astype(np.float32)
    assert network.model(larger).shape == (1, 4, 7, 1000)


def test_recast_mobilenet_v1_equals_its_classifier(tmp_path):
    """Real ImageNet weights: the 7x7 window at 224 is the classifier; 1x1 cells average to its logits."""
    backbone = instantiate(compose_config(["backbone=mobilenet_v1"], tmp_path).backbone)
    images = np.stack([np.asarray(Image.fromarray(photo).resize((224, 224)), np.float32)
                       for photo in (skimage_data.chelsea(), skimage_data.coffee())])
    classifier = backbone.build(include_top=True)
    probabilities = np.asarray(classifier(ImagePreprocessing("tf")(images)))

    windowed = fully_convolutional(backbone, pooling_window=7)
    assert windowed.window == 7
    np.testing.assert_allclose(np.asarray(windowed.model(images))[:, 0, 0], probabilities, atol=1e-5)

    cells = fully_convolutional(backbone, pooling_window=1)
    assert cells.window == 1 and cells.model(images).shape == (2, 7, 7, 1000)
    cell_logits = np.asarray(keras.Model(cells.model.input, cells.model.get_layer("conv_preds_conv").output)(images))
    logits = np.log(probabilities)
    np.testing.assert_allclose(cell_logits.mean(axis=(1, 2)) - cell_logits.mean(axis=(1, 2, 3))[:, None],
                               logits - logits.mean(axis=-1, keepdims=True), atol=2e-3)


def test_upsampled_cells_are_centred_on_their_windows():
    peak = np.zeros((3, 4, 1), np.float32)
    peak[1, 2] = 1.0
    # 1x1 windows: cell (1, 2) covers pixels 32..63 x 64..95; its value peaks at their centre.
    upsampled = upsample_scores(peak, window=1, size=(96, 128))[..., 0]
    assert upsampled.shape == (96, 128)
    np.testing.assert_array_equal(np.flatnonzero(upsampled.max(1) == upsampled.max()), [47, 48])
    np.testing.assert_array_equal(np.flatnonzero(upsampled.max(0) == upsampled.max()), [79, 80])
    # 7x7 windows (VGG16's fc6): cell (1, 2) sees pixels 32..255 x 64..287, centred at 143.5, 175.5.
    upsampled = upsample_scores(peak, window=7, size=(96 + 192, 128 + 192))[..., 0]
    np.testing.assert_array_equal(np.flatnonzero(upsampled.max(1) == upsampled.max()), [143, 144])
    np.testing.assert_array_equal(np.flatnonzero(upsampled.max(0) == upsampled.max()), [175, 176])

    # Class boundaries fall between cells; the outer cells extend to the image's borders.
    stripes = np.eye(3, dtype=np.float32)[np.repeat(np.arange(3)[:, None], 4, axis=1)]
    labels = upsample_scores(stripes, window=7, size=(96 + 192, 128 + 192)).argmax(-1)
    np.testing.assert_array_equal(labels[:, 0], np.repeat([0, 1, 2], [96 + 32, 32, 32 + 96]))


def test_working_size_is_a_multiple_of_32_within_bounds():
    assert working_size(300, 451, 224, None) == (288, 448)
    assert working_size(300, 451, 32, 224) == (160, 224)
    assert working_size(100, 400, 224, 1024) == (224, 896)  # small side raised to one fc6 window
    assert working_size(2000, 3000, 32, 1024) == (672, 1024)


def test_annotate_writes_the_maps_figure_and_classes_of_real_photos(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a JPEG")
    cfg = compose_annotate([f"inputs=[{PHOTOS / 'coffee.png'},{PHOTOS / 'chelsea.png'},{broken}]"], tmp_path)
    records = annotate(cfg)
    assert json.loads((tmp_path / "run" / "annotations.json").read_text()) == records
    coffee, cat, unreadable = records
    # The decoder's reason, as predict.py prints it, without TensorFlow's op text.
    assert unreadable == {"path": str(broken), "error": decode_error(str(broken))}
    assert "[Op:" not in unreadable["error"] and "{{" not in unreadable["error"]
    assert coffee["classes"][0]["name"] == "espresso" and coffee["classes"][0]["share"] > 0.5
    assert 281 <= cat["classes"][0]["index"] <= 285  # a cat class covers most of the cat photo
    for record, shape in ((coffee, (400, 600)), (cat, (300, 451))):
        assert record["image_size"] == list(shape)
        assert np.asarray(record["coarse_class_map"]).shape == tuple(record["map_size"])
        assert sum(entry["share"] for entry in record["classes"]) == pytest.approx(1.0)
        labels = np.asarray(Image.open(record["labels_png"]))
        assert labels.shape == shape
        assert set(np.unique(labels)) <= {entry["index"] for entry in record["classes"]}
        with Image.open(record["annotation_png"]) as figure:
            assert figure.format == "PNG" and figure.width > figure.height
    assert Path(coffee["annotation_png"]) == tmp_path / "run" / "coffee" / "annotation.png"


def test_command_line_composes_the_config_without_loading_tensorflow():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "annotate.py", "backbone=vgg16", "inputs=[a.jpg]", "--cfg", "job"],
                            cwd=CONF.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pipeline.importers.slim.vgg16_checkpoint_weights" in result.stdout
    assert "pooling_window: 7" in result.stdout


def test_the_legend_names_one_other_class_in_the_singular():
    label_map = np.repeat(np.array([[1, 1, 2, 3]]), 4, axis=0)
    classes = [{"index": index, "name": f"n0000000{index}, class {index}", "share": share, "best_score": 0.9}
               for index, share in ((1, 0.5), (2, 0.25), (3, 0.25))]
    annotation = Annotation(np.zeros((1, 1, 4)), np.zeros((1, 1), dtype=int), label_map, classes)
    figure = plot_annotation(np.zeros((4, 4, 3), dtype=np.uint8), annotation, max_classes=2)
    labels = [label.get_text() for label in figure.axes[-1].get_yticklabels()]
    assert labels[-1] == "other (1 class, 25 %)", labels
    figure = plot_annotation(np.zeros((4, 4, 3), dtype=np.uint8), annotation, max_classes=1)
    assert figure.axes[-1].get_yticklabels()[-1].get_text() == "other (2 classes, 50 %)"
