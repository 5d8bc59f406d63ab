"""Custom Keras layers that are saved inside `.keras` files (registered for safe deserialization)."""

from __future__ import annotations

import keras
from keras import ops

# keras.applications.imagenet_utils.preprocess_input's modes, as constants a layer can carry.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("tf", "caffe", "torch", "none")


@keras.saving.register_keras_serializable(package="pipeline")
class ImagePreprocessing(keras.layers.Layer):
    """Maps RGB pixels in [0, 255] to what a backbone expects, inside the model.

    Equal to `keras.applications.imagenet_utils.preprocess_input(x, mode=mode)`, but as a layer, so
    an exported model takes raw images and loads with `safe_mode=True` (a `Lambda` would not).

    Args:
        mode: "tf" (to [-1, 1]), "caffe" (RGB to BGR, minus the ImageNet mean), "torch" (to [0, 1],
            minus mean, over std) or "none" (the backbone normalises by itself, as EfficientNet does).
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; expected one of {MODES}.")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
