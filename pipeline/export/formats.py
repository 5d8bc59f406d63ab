"""Write a Keras model as a SavedModel, a LiteRT flatbuffer or ONNX: float32, uint8 images of any size in."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.export.runtimes import litert_runner

log = logging.getLogger(__name__)

# One image batch of any size: what model.keras takes. LiteRT may need a fixed size (see write_litert).
ANY_SIZE = tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` itself if it computes in float32; else the same network rebuilt in float32 with its weights.

    Mixed-precision layers keep float32 variables, so the weights carry over unchanged. ONNX and
    LiteRT files of a float16 graph would differ from training's float32 softmax and run slowly on
    CPUs; a float32 copy is what every runtime handles.
    """
    serialized = keras.saving.serialize_keras_object(model)
    if not _set_float32(serialized):
        return model
    copy = keras.saving.deserialize_keras_object(serialized)
    copy.set_weights(model.get_weights())
    log.info("%s computes in mixed precision: exported in float32.", model.name)
    return copy


def _set_float32(node) -> bool:
    """Replaces every mixed dtype policy in a serialized model by float32; True if there was one."""
    changed = False
    if isinstance(node, dict):
        if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and \
                str(node.get("config", {}).get("name", "")).startswith("mixed_"):
            node["config"]["name"] = "float32"
            return True
        for key, value in node.items():
            if key == "dtype" and isinstance(value, str) and value.startswith("mixed_"):
                node[key] = "float32"
                changed = True
            else:
                changed |= _set_float32(value)
    elif isinstance(node, list):
        for value in node:
            changed |= _set_float32(value)
    return changed


def write_saved_model(model: keras.Model, path: Path) -> str:
    """A SavedModel whose `serve` signature takes uint8 images of any size (TF Serving, `tf.saved_model.load`)."""
    model.export(str(path), format="tf_saved_model", input_signature=[ANY_SIZE], verbose=False)
    return "serve signature: uint8 [batch, height, width, 3], any size"


def write_onnx(model: keras.Model, path: Path) -> str:
    """ONNX through tf2onnx (Keras's own ONNX export): uint8 images of any size."""
    model.export(str(path), format="onnx", input_signature=[ANY_SIZE], verbose=False)
    return "input 'image': uint8 [batch, height, width, 3], any size"


def write_litert(model: keras.Model, path: Path, image_size: tuple[int, int] | None) -> str:
    """A LiteRT (TFLite) flatbuffer with built-in ops only: any image size if that converts and runs,
    else fixed at `image_size` (the training size) with batch 1.

    Args:
        model: the float32 model.
        path: the `.tflite` file.
        image_size: (height, width) for the fixed-size fallback.
    """
    try:
        model.export(str(path), format="litert", input_signature=[ANY_SIZE], verbose=False)
        litert_runner(path)(np.zeros((1, 37, 53, 3), np.uint8))  # ops that need TensorFlow's Flex fail here
        return "input 'image': uint8 [batch, height, width, 3], any size"
    except Exception as error:  # noqa: BLE001  the converter and the interpreter raise many kinds
        if image_size is None:
            raise ValueError(f"LiteRT could not convert {model.name} for images of any size ({error}), and no "
                             "training image size is known for a fixed-size file. Pass image_size.") from error
        log.warning("LiteRT at any image size failed (%s); converting at the training size %s.",
                    str(error).splitlines()[0], image_size)
    height, width = (int(side) for side in image_size)
    if os.path.exists(path):
        os.remove(path)
    model.export(str(path), format="litert", verbose=False,
                 input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, name="image")])
    return f"input 'image': uint8 [1, {height}, {width}, 3], FIXED at the training size: resize images to it first"
