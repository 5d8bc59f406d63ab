"""Pretrained backbones: a keras.applications constructor plus the facts each one's YAML states."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import warnings
from typing import Callable, Iterator

import keras
import numpy as np

from pipeline.checks import check_weights_file
from pipeline.layers import ImagePreprocessing

log = logging.getLogger(__name__)


class Backbone:
    """A convolutional base cut at its stride-32 feature layer, with its weights and preprocessing.

    Args:
        name: short name used in logs and cache keys (`mobilenet_v1`).
        application: `keras.applications` constructor (a partial) taking `include_top`, `weights`
            and `input_shape`.
        preprocessing: `ImagePreprocessing` mode this backbone's weights were trained with.
        input_size: default `[height, width]` the weights were trained at.
        feature_layer: name of the stride-32 layer that transfer heads and FCN-32s read.
        weights: "imagenet", None (random initialisation) or a path to a `.h5` / `.weights.h5` file
            that fits the model without its top, or to a checkpoint `checkpoint_importer` reads.
        imagenet_weights: where "imagenet" comes from offline: a callable
            `(include_top: bool) -> path of a .weights.h5 file`; None lets `keras.applications`
            download them (needs a network).
        checkpoint_importer: reads a `weights` path that is not a Keras `.h5` file (a TF-Slim
            checkpoint or frozen graph, a PyTorch state dict): a callable
            `(path: str, include_top: bool) -> path of a .weights.h5 file`; None: `.h5` files only.
        trainable: False freezes the whole base (BatchNorm then runs in inference mode).
    """

    def __init__(
        self,
        name: str,
        application: Callable[..., keras.Model],
        preprocessing: str,
        input_size: list[int],
        feature_layer: str,
        weights: str | None = "imagenet",
        imagenet_weights: Callable[..., str] | None = None,
        trainable: bool = False,
        checkpoint_importer: Callable[..., str] | None = None,
    ):
        self.name = name
        self.application = application
        self.preprocessing = preprocessing
        self.input_size = tuple(input_size)
        self.feature_layer = feature_layer
        self.weights = weights
        self.imagenet_weights = imagenet_weights
        self.trainable = trainable
        self.checkpoint_importer = checkpoint_importer
        check_weights_file(name, weights, checkpoint_importer is not None)  # also run before TensorFlow loads

    def _weights_argument(self, include_top: bool) -> str | None:
        # Converting weights builds throw-away models whose initialisers draw random numbers; only the
        # first run converts, so without this a cold and a warm cache would initialise the head apart.
        with preserved_random_state():
            return self._converted_weights(include_top)

    def _converted_weights(self, include_top: bool) -> str | None:
        if self.weights == "imagenet" and self.imagenet_weights is not None:
            return self.imagenet_weights(include_top=include_top)
        if self.checkpoint_importer is not None and self.weights not in (None, "imagenet") and not str(
            self.weights
        ).endswith(".h5"):
            return self.checkpoint_importer(path=str(self.weights), include_top=include_top)
        return self.weights

    def build(self, image_size: list[int] | None = None, include_top: bool = False) -> keras.Model:
        """Builds the base (or with `include_top`, the whole ImageNet classifier) with its weights.

        Args:
            image_size: `[height, width]`; None keeps the backbone's `input_size`.
            include_top: keep the 1000-class classifier instead of cutting at `feature_layer`.
        """
        height, width = image_size or self.input_size
        weights = self._weights_argument(include_top)
        try:
            # Keras warns once per layer a wrong weights file does not fit, then raises anyway:
            # hold the warnings back and show them only if the model was built.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = self.application(
                    include_top=include_top, weights=weights, input_shape=(height, width, 3)
                )
        except OSError as error:  # h5py: not an HDF5 file, or a truncated one
            if weights in (None, "imagenet"):
                raise
            raise ValueError(
                f"backbone.weights={self.weights} cannot be read as Keras weights ({weights}): "
                f"{short_message(error)}. The file is truncated or not an .h5 / .weights.h5 file; download "
                "it again, or give a checkpoint the backbone's importer reads."
            ) from error
        except ValueError as error:
            if weights not in (None, "imagenet") and self._builds_without_weights(height, width, include_top):
                raise ValueError(
                    f"backbone.weights={self.weights!r} does not fit backbone {self.name!r} "
                    f"(include_top={include_top}): {short_message(error)}. Give a weights file saved from this "
                    f"architecture{' with' if include_top else ' without'} its top, or backbone.weights=imagenet."
                ) from error
            raise ValueError(
                f"Backbone {self.name!r} cannot be built with image_size=[{height}, {width}], "
                f"include_top={include_top}, weights={weights!r}: {short_message(error)}"
            ) from error
        except Exception as error:  # keras.utils.get_file raises a bare Exception when offline
            if weights != "imagenet":
                raise
            if include_top:  # an ImageNet classifier is wanted (predict, annotate): random weights are no use
                advice = ("Offline, use backbone=mobilenet_v1, mobilenet_v2_torchvision or efficientnet_lite0 "
                          "(their ImageNet classifiers ship in pip packages), or "
                          f"backbone.weights=/path/to/{self.name}_weights.h5 with the classifier included.")
            else:
                advice = ("Offline, use backbone=mobilenet_v1, mobilenet_v2_torchvision, efficientnet_lite0 or "
                          "vgg16_hed (their weights ship in pip packages), backbone.weights=null for random "
                          "initialisation, or backbone.weights=/path/to/file.weights.h5.")
            raise RuntimeError(
                f"Could not get ImageNet weights for backbone {self.name!r}: {error}\n"
                f"keras.applications downloads them, which needs a network. {advice}"
            ) from error
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if not include_top:
            model = keras.Model(
                model.input, model.get_layer(self.feature_layer).output, name=self.name
            )
        model.trainable = self.trainable
        return model

    def _builds_without_weights(self, height: int, width: int, include_top: bool) -> bool:
        """Whether the architecture builds at this size with random weights (then a file was wrong)."""
        try:
            self.application(include_top=include_top, weights=None, input_shape=(height, width, 3))
        except ValueError:
            return False
        return True

    def feature_extractor(self, image_size: list[int] | None = None) -> keras.Model:
        """Preprocessing plus the base: float RGB in [0, 255] to stride-32 feature maps."""
        base = self.build(image_size)
        inputs = keras.Input(base.input_shape[1:], name="image")
        x = ImagePreprocessing(self.preprocessing, name="preprocessing")(inputs)
        return keras.Model(inputs, base(x, training=False), name=f"{self.name}_features")


def short_message(error: BaseException, limit: int = 400) -> str:
    """An error's message on one line, without the tensor values Keras prints after `Target variable:`."""
    text = str(error).split(" Target variable:", 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restores every random state Keras draws from (Python, NumPy, Keras's global seed) on exit.

    Keras initialisers without a seed draw one from Python's `random`; `keras.random` calls without a
    seed advance the global `SeedGenerator`. Code run inside leaves the rest of the run's random
    numbers exactly as if it had not run, so results do not depend on what a cache already holds.
    """
    from keras.src.backend.common import global_state  # Keras keeps its global seed generator here
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

    python_state, numpy_state = random.getstate(), np.random.get_state()
    generator = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    generator_state = None if generator is None else keras.ops.convert_to_numpy(generator.state)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, generator)
        if generator is not None:
            generator.state.assign(generator_state)


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 over every weight's name, shape and bytes: equal fingerprints mean equal features."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{variable.path}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def unfreeze_top(model: keras.Model, layers: int) -> None:
    """Makes the last `layers` layers of a base trainable, keeping BatchNorm frozen.

    BatchNorm statistics learned on ImageNet are kept (the keras-io fine-tuning guide's advice): the
    base is also called with `training=False`, so they stay in inference mode.

    Args:
        model: the base built by `Backbone.build`.
        layers: how many layers from the top to unfreeze; -1 unfreezes all.
    """
    model.trainable = True
    chosen = model.layers if layers < 0 else model.layers[len(model.layers) - layers :]
    chosen = set(id(layer) for layer in chosen)
    for layer in model.layers:
        layer.trainable = id(layer) in chosen and not isinstance(
            layer, keras.layers.BatchNormalization
        )
