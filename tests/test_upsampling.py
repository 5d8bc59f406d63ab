"""The bilinear upsampling layer equals scikit-image's bilinear rescale, in both forms, and saves."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import keras
import numpy as np
import pytest
from skimage.transform import rescale

import pipeline.layers  # noqa: F401  registers the layers and the initializer for loading
from pipeline.upsampling import (BilinearInitializer, BilinearUpsampling, bilinear_filter, bilinear_kernel_size,
                                 bilinear_upsampling_layer, dense_kernel_weights, factor_of_kernel_size,
                                 per_class_kernel_weights)
from tests.conftest import CONF

FORMS = ("per_class", "dense")


def skimage_reference(x: np.ndarray, factor: int) -> np.ndarray:
    """Each channel rescaled by scikit-image: bilinear, zeros outside, and no clipping to the input range."""
    return np.stack([np.stack([rescale(image[:, :, c].astype(np.float64), factor, order=1, mode="constant",
                                       cval=0, clip=False) for c in range(x.shape[-1])], axis=-1)
                     for image in x])


@pytest.mark.parametrize("form", FORMS)
def test_equals_skimage_rescale_for_every_factor_and_non_square_inputs(form):
    rng = np.random.default_rng(0)
    for factor in range(2, 33):
        # Non-square, odd sides; values not starting at 0, so zero padding at the borders would show.
        x = rng.uniform(1.0, 5.0, size=(2, 3, 5, 3)).astype("float32")
        y = keras.ops.convert_to_numpy(bilinear_upsampling_layer(factor, 3, form)(x))
        assert y.shape == (2, 3 * factor, 5 * factor, 3)
        np.testing.assert_allclose(y, skimage_reference(x, factor), atol=1e-5, err_msg=f"factor {factor}")


def test_clip_false_matters_the_borders_fall_towards_zero():
    x = np.full((1, 2, 3, 1), 10.0, dtype="float32")
    y = keras.ops.convert_to_numpy(bilinear_upsampling_layer(4, 1)(x))[0, :, :, 0]
    assert y[0, 0] < 10 and y[4, 6] == pytest.approx(10), "zeros outside the input pull the border pixels down"
    assert rescale(x[0, :, :, 0], 4, order=1, mode="constant", cval=0).min() == 10, "skimage's default clip hides it"


@pytest.mark.parametrize("form", FORMS)
def test_any_size_in_a_functional_model_and_wider_inputs(form):
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, bilinear_upsampling_layer(32, 4, form)(inputs))
    x = np.random.default_rng(1).normal(size=(1, 2, 7, 4)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), skimage_reference(x, 32), atol=1e-5)


def test_kernel_sizes_and_weight_counts():
    assert [bilinear_kernel_size(f) for f in (2, 3, 8, 32)] == [4, 5, 16, 64]
    assert all(factor_of_kernel_size(bilinear_kernel_size(f)) == f for f in range(2, 65))
    kernel = bilinear_filter(2)
    np.testing.assert_allclose(kernel[0], [0.0625, 0.1875, 0.1875, 0.0625])  # taps 1/4, 3/4, 3/4, 1/4
    for classes, dense, per_class in ((21, 1_806_336, 86_016), (81, 26_873_856, 331_776),
                                      (1000, 4_096_000_000, 4_096_000)):
        assert dense_kernel_weights(32, classes) == dense and per_class_kernel_weights(32, classes) == per_class
    for form, expected in (("dense", 1_806_336), ("per_class", 86_016)):
        layer = bilinear_upsampling_layer(32, 21, form)
        layer.build((None, None, None, 21))
        assert layer.count_params() == expected, form


def test_initializer_shapes_and_clear_errors():
    dense = keras.ops.convert_to_numpy(BilinearInitializer()((4, 4, 3, 3)))
    assert np.count_nonzero(dense[:, :, 0, 1]) == 0 and np.allclose(dense[:, :, 2, 2], bilinear_filter(2))
    assert keras.ops.convert_to_numpy(BilinearInitializer()((5, 5, 2))).shape == (5, 5, 2)
    with pytest.raises(ValueError, match="filters must equal its input channels"):
        BilinearInitializer()((4, 4, 3, 2))
    with pytest.raises(ValueError, match="square"):
        BilinearInitializer()((4, 5, 3, 3))
    with pytest.raises(ValueError, match="integer >= 2"):
        BilinearUpsampling(1)
    with pytest.raises(ValueError, match="per_class' or 'dense'"):
        bilinear_upsampling_layer(32, 3, "sparse")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("trainable", [False, True])
def test_fixed_or_trainable_and_saved_in_keras_files(form, trainable, tmp_path):
    inputs = keras.Input((None, None, 2))
    layer = bilinear_upsampling_layer(8, 2, form, trainable=trainable, name="upsample_8x")
    model = keras.Model(inputs, layer(inputs))
    assert len(model.trainable_weights) == (1 if trainable else 0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert loaded.get_layer("upsample_8x").trainable == trainable
    x = np.random.default_rng(2).normal(size=(1, 3, 4, 2)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    if trainable:  # a trainable kernel learns: one SGD step towards a target moves it
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = keras.ops.convert_to_numpy(layer.weights[0]).copy()
        model.fit(x, np.zeros((1, 24, 32, 2), "float32"), epochs=1, verbose=0)
        assert not np.allclose(before, keras.ops.convert_to_numpy(layer.weights[0]))


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_same_output_under_the_jax_backend():
    code = (
        "import numpy as np, keras; from pipeline.upsampling import bilinear_upsampling_layer;"
        "from tests.test_upsampling import skimage_reference;"
        "assert keras.backend.backend() == 'jax';"
        "x = np.random.default_rng(0).normal(size=(1, 3, 5, 2)).astype('float32');"
        "[np.testing.assert_allclose(np.asarray(bilinear_upsampling_layer(f, 2, form)(x)),"
        " skimage_reference(x, f), atol=1e-5) for f in (2, 3, 16, 31, 32) for form in ('per_class', 'dense')]"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=CONF.parent, capture_output=True, text=True,
                            env={**__import__("os").environ, "KERAS_BACKEND": "jax"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_auto_takes_the_dense_kernel_only_while_it_fits_in_16_mib():
    for classes, form in ((21, keras.layers.Conv2DTranspose), (32, keras.layers.Conv2DTranspose),
                          (33, BilinearUpsampling), (1000, BilinearUpsampling)):
        assert type(bilinear_upsampling_layer(32, classes)) is form, classes
