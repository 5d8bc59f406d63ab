"""TF-Slim checkpoints into Keras: vgg_16 with its fc layers (random values under slim's names) and MobileNet v1.

No real vgg_16.ckpt is available offline, so the VGG16 tests write checkpoints whose variables carry
TF-Slim's names and shapes (`vgg_16/conv1/conv1_1/weights` ... `vgg_16/fc8/biases`) and random
values, and check that every variable lands in the right Keras layer with the right layout: value by
value, and by running the slim network itself (written below with `tf.nn` ops, as `nets/vgg.py`
defines it: fc6 a 7x7 'VALID' convolution over pool5, fc7 / fc8 1x1 convolutions) against Keras.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra.utils import instantiate

from pipeline.backbones import weights_fingerprint
from pipeline.importers import slim
from pipeline.importers.packaged import packaged_file
from tests.conftest import compose_config

skimage_data = pytest.importorskip("skimage.data")

VGG_BLOCKS = {1: (2, 64), 2: (2, 128), 3: (3, 256), 4: (3, 512), 5: (3, 512)}
SLIM_MEAN_RGB = (123.68, 116.78, 103.94)  # nets/vgg preprocessing (_R_MEAN, _G_MEAN, _B_MEAN)
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # Keras's caffe mode, read in RGB order


def slim_vgg16_shapes(classes: int = 1000, top: bool = True) -> dict[str, tuple[int, ...]]:
    shapes, channels = {}, 3
    for block, (count, width) in VGG_BLOCKS.items():
        for index in range(1, count + 1):
            shapes[f"vgg_16/conv{block}/conv{block}_{index}/weights"] = (3, 3, channels, width)
            shapes[f"vgg_16/conv{block}/conv{block}_{index}/biases"] = (width,)
            channels = width
    if top:
        shapes.update({"vgg_16/fc6/weights": (7, 7, 512, 4096), "vgg_16/fc6/biases": (4096,),
                       "vgg_16/fc7/weights": (1, 1, 4096, 4096), "vgg_16/fc7/biases": (4096,),
                       "vgg_16/fc8/weights": (1, 1, 4096, classes), "vgg_16/fc8/biases": (classes,)})
    return shapes


def random_variables(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """He-uniform kernels (activations keep their scale through 16 layers) and small random biases."""
    rng = np.random.default_rng(seed)
    variables = {}
    for name, shape in shapes.items():
        value = rng.random(shape, dtype=np.float32)
        if name.endswith("/weights"):
            limit = np.float32(np.sqrt(6.0 / np.prod(shape[:-1])))
            value = (value * 2 - 1) * limit
        else:
            value = (value - 0.5) * np.float32(0.1)
        variables[name] = value
    return variables


def write_checkpoint(prefix, variables: dict[str, np.ndarray], version: int = 2) -> str:
    """A TF1 checkpoint with exactly these variable names (what tf.compat.v1.train.Saver writes)."""
    names = list(variables)
    tensors = [tf.constant(variables[name]) for name in names]
    if version == 2:
        tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=tensors)
    else:
        tf.raw_ops.Save(filename=str(prefix), tensor_names=names, data=tensors)
    return str(prefix)


def slim_vgg16_logits(variables: dict[str, np.ndarray], rgb: np.ndarray, mean=SLIM_MEAN_RGB) -> np.ndarray:
    """TF-Slim's vgg_16 forward pass (inference) from its variables, on RGB images in [0, 255]."""
    x = tf.constant(rgb, tf.float32) - tf.constant(mean, tf.float32)
    for block, (count, _) in VGG_BLOCKS.items():
        for index in range(1, count + 1):
            scope = f"vgg_16/conv{block}/conv{block}_{index}"
            x = tf.nn.relu(tf.nn.conv2d(x, variables[f"{scope}/weights"], 1, "SAME") + variables[f"{scope}/biases"])
        x = tf.nn.max_pool2d(x, 2, 2, "VALID")
    x = tf.nn.relu(tf.nn.conv2d(x, variables["vgg_16/fc6/weights"], 1, "VALID") + variables["vgg_16/fc6/biases"])
    x = tf.nn.relu(tf.nn.conv2d(x, variables["vgg_16/fc7/weights"], 1, "VALID") + variables["vgg_16/fc7/biases"])
    x = tf.nn.conv2d(x, variables["vgg_16/fc8/weights"], 1, "VALID") + variables["vgg_16/fc8/biases"]
    return tf.squeeze(x, [1, 2]).numpy()  # slim's spatial_squeeze


def photos(size: int = 224) -> np.ndarray:
    crops = [image[:size, :size] for image in (skimage_data.chelsea(), skimage_data.coffee())]
    return np.stack(crops).astype(np.float32)


@pytest.fixture(scope="module")
def vgg_1001():
    """slim vgg_16 variables with a background class, and the Keras VGG16 (logits out) filled from them."""
    variables = random_variables(slim_vgg16_shapes(classes=1001))
    model = keras.applications.VGG16(weights=None, classifier_activation=None)
    slim.assign_slim_vgg16(model, variables)
    return variables, model


def test_every_slim_vgg16_variable_lands_in_its_keras_layer_with_keras_layout(vgg_1001):
    variables, model = vgg_1001
    for block, (count, _) in VGG_BLOCKS.items():
        for index in range(1, count + 1):
            kernel, bias = model.get_layer(f"block{block}_conv{index}").get_weights()
            expected = variables[f"vgg_16/conv{block}/conv{block}_{index}/weights"]
            if (block, index) == (1, 1):
                expected = expected[:, :, ::-1, :]  # RGB -> BGR for Keras's caffe preprocessing
            np.testing.assert_array_equal(kernel, expected)
            np.testing.assert_array_equal(bias, variables[f"vgg_16/conv{block}/conv{block}_{index}/biases"])
    fc1, fc2, predictions = (model.get_layer(name).get_weights() for name in ("fc1", "fc2", "predictions"))
    np.testing.assert_array_equal(fc1[0], variables["vgg_16/fc6/weights"].reshape(25088, 4096))
    np.testing.assert_array_equal(fc2[0], variables["vgg_16/fc7/weights"][0, 0])
    np.testing.assert_array_equal(predictions[0], variables["vgg_16/fc8/weights"][0, 0, :, 1:])  # background dropped
    np.testing.assert_array_equal(predictions[1], variables["vgg_16/fc8/biases"][1:])
    assert predictions[0].shape == (4096, 1000)


def test_fc6_as_a_7x7_convolution_equals_keras_flatten_then_dense(vgg_1001):
    """The reshape follows Keras's Flatten order of a (7, 7, 512) map: row, column, channel."""
    variables, model = vgg_1001
    pool5 = np.random.default_rng(1).random((2, 7, 7, 512), dtype=np.float32)
    convolution = tf.nn.conv2d(pool5, variables["vgg_16/fc6/weights"], 1, "VALID")[:, 0, 0] + variables[
        "vgg_16/fc6/biases"]
    flatten_then_dense = model.get_layer("fc1")(model.get_layer("flatten")(pool5))
    np.testing.assert_allclose(np.asarray(flatten_then_dense), np.maximum(convolution.numpy(), 0), rtol=1e-5,
                               atol=1e-5)


def test_keras_vgg16_with_caffe_preprocessing_reproduces_the_slim_network(vgg_1001):
    """Real photos through slim's own graph (RGB minus slim's means) and through Keras (BGR, caffe)."""
    from pipeline.layers import ImagePreprocessing

    variables, model = vgg_1001
    rgb = photos()
    keras_logits = np.asarray(model(ImagePreprocessing("caffe")(rgb)))
    # Same means in both: the layout is exact up to float32 summation order.
    same_mean = slim_vgg16_logits(variables, rgb, mean=CAFFE_MEAN_RGB)[:, 1:]
    scale = np.abs(same_mean).max()
    assert scale > 0.1, "random weights should keep the logits away from zero"
    np.testing.assert_allclose(keras_logits, same_mean, rtol=0, atol=2e-5 * scale)
    # slim's own means differ from Keras's by 0.001 in G and B: a negligible shift of the logits.
    own_mean = slim_vgg16_logits(variables, rgb)[:, 1:]
    np.testing.assert_allclose(keras_logits, own_mean, rtol=0, atol=1e-3 * scale)
    np.testing.assert_array_equal(keras_logits.argmax(-1), own_mean.argmax(-1))


def test_checkpoint_file_forms_and_versions(tmp_path):
    variables = {"vgg_16/conv1/conv1_1/biases": np.arange(64, dtype=np.float32),
                 "global_step": np.array(7, dtype=np.int64)}
    prefix = write_checkpoint(tmp_path / "v2" / "model.ckpt", variables)
    for form in (prefix, f"{prefix}.index", f"{prefix}.data-00000-of-00001"):
        read = slim.read_checkpoint_variables(form)
        assert set(read) == set(variables)
        np.testing.assert_array_equal(read["vgg_16/conv1/conv1_1/biases"], variables["vgg_16/conv1/conv1_1/biases"])
    os.makedirs(tmp_path / "v1")
    v1 = write_checkpoint(tmp_path / "v1" / "model.ckpt", variables, version=1)
    assert slim.checkpoint_files(v1) == [tmp_path / "v1" / "model.ckpt"]
    np.testing.assert_array_equal(slim.read_checkpoint_variables(v1)["global_step"], 7)
    with pytest.raises(FileNotFoundError, match="No TensorFlow checkpoint"):
        slim.read_checkpoint_variables(tmp_path / "missing.ckpt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    prefix = write_checkpoint(tmp_path / "model.ckpt", random_variables(slim_vgg16_shapes(top=False)))
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or not a checkpoint"):
        slim.read_checkpoint_variables(prefix)


def test_wrong_checkpoint_lists_every_problem_and_assigns_nothing():
    variables = random_variables(slim_vgg16_shapes(top=False))
    del variables["vgg_16/conv3/conv3_2/weights"]
    variables["vgg_16/conv4/conv4_1/biases"] = np.zeros(3, np.float32)
    variables["vgg_16/conv6/conv6_1/weights"] = np.zeros((3, 3, 512, 512), np.float32)
    model = keras.applications.VGG16(include_top=False, weights=None)
    before = [weight.copy() for weight in model.get_weights()]
    with pytest.raises(ValueError) as error:
        slim.assign_slim_vgg16(model, variables)
    message = str(error.value)
    assert "block3_conv2/kernel: the checkpoint has no variable 'vgg_16/conv3/conv3_2/weights'" in message
    assert "block4_conv1/bias: Keras expects shape (512,)" in message
    assert "vgg_16/conv6/conv6_1/weights: TF-Slim variable" in message
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_convolutions_only_checkpoint_through_the_backbone_config(tmp_path):
    """`backbone=vgg16 backbone.weights=/path/model.ckpt` with a checkpoint without fc6-fc8: the base."""
    variables = random_variables(slim_vgg16_shapes(top=False))
    prefix = write_checkpoint(tmp_path / "checkpoints" / "vgg_16.ckpt", variables)
    backbone = instantiate(compose_config(["backbone=vgg16", f"backbone.weights={prefix}"], tmp_path).backbone)
    base = backbone.build()
    np.testing.assert_array_equal(base.get_layer("block5_conv3").get_weights()[0],
                                  variables["vgg_16/conv5/conv5_3/weights"])
    assert [p.name for p in (tmp_path / ".cache" / "weights").iterdir()] == [
        f"vgg16_slim-{slim.checkpoint_sha256(prefix)[:16]}_notop.weights.h5"]
    with pytest.raises(ValueError, match="no vgg_16/fc6-fc8 variables"):
        backbone.build(include_top=True)


@pytest.mark.slow
def test_full_vgg_16_checkpoint_gives_an_imagenet_classifier_through_the_config(tmp_path):
    """The user's path end to end, at full size (553 MB of random values): about 45 s and 4 GB."""
    variables = random_variables(slim_vgg16_shapes(classes=1001))
    prefix = write_checkpoint(tmp_path / "vgg_16.ckpt", variables)
    backbone = instantiate(compose_config(["backbone=vgg16", f"backbone.weights={prefix}"], tmp_path).backbone)
    classifier = backbone.build(include_top=True)
    rgb = photos()
    probabilities = np.asarray(classifier(keras.applications.vgg16.preprocess_input(rgb.copy())))
    logits = slim_vgg16_logits(variables, rgb, mean=CAFFE_MEAN_RGB)[:, 1:]
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(-1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(backbone.build().get_layer("block1_conv2").get_weights()[0],
                                  variables["vgg_16/conv1/conv1_2/weights"])


def test_mobilenet_v1_checkpoint_gives_the_same_weights_as_the_frozen_graph(tmp_path):
    """The nudity graph's MobilenetV1 constants written as a slim checkpoint convert to the same model."""
    graph = packaged_file(slim.SOURCE_PACKAGE, slim.SOURCE_FILE, slim.SOURCE_SHA256)
    constants = slim.read_graph_constants(graph)
    variables = {name: value for name, value in constants.items()
                 if name.startswith("MobilenetV1/") and not name.startswith("MobilenetV1/MobilenetV1/")
                 and name.endswith(("/weights", "/depthwise_weights", "/biases", "/gamma", "/beta",
                                    "/moving_mean", "/moving_variance"))}
    prefix = write_checkpoint(tmp_path / "mobilenet_v1_1.0_224.ckpt", variables)
    from_checkpoint = instantiate(compose_config(
        ["backbone=mobilenet_v1", f"backbone.weights={prefix}"], tmp_path).backbone)
    packaged = instantiate(compose_config(["backbone=mobilenet_v1"], tmp_path).backbone)
    for include_top in (False, True):
        assert weights_fingerprint(from_checkpoint.build(include_top=include_top)) == weights_fingerprint(
            packaged.build(include_top=include_top))
    # A frozen graph path goes through the same importer (here: the packaged graph itself).
    from_graph = instantiate(compose_config(["backbone=mobilenet", f"backbone.weights={graph}"], tmp_path).backbone)
    assert weights_fingerprint(from_graph.build()) == weights_fingerprint(packaged.build())
