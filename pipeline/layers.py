"""Custom Keras layers that are saved inside `.keras` files (registered for safe deserialization)."""

from __future__ import annotations

import keras
from keras import ops

# keras.applications.imagenet_utils.preprocess_input's modes, as constants a layer can carry.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite: MEAN_RGB = 127, STDDEV_RGB = 128 (efficientnet/lite/efficientnet_lite_builder.py).
_LITE_MEAN, _LITE_STD = 127.0, 128.0
MODES = ("tf", "caffe", "torch", "lite", "none")


@keras.saving.register_keras_serializable(package="pipeline")
class ImagePreprocessing(keras.layers.Layer):
    """Maps RGB pixels in [0, 255] to what a backbone expects, inside the model.

    Equal to `keras.applications.imagenet_utils.preprocess_input(x, mode=mode)`, but as a layer, so
    an exported model takes raw images and loads with `safe_mode=True` (a `Lambda` would not).

    Args:
        mode: "tf" (to [-1, 1]), "caffe" (RGB to BGR, minus the ImageNet mean), "torch" (to [0, 1],
            minus mean, over std), "lite" (`(x - 127) / 128`, EfficientNet-Lite's own; not a
            `preprocess_input` mode) or "none" (the backbone normalises by itself, as EfficientNet does).
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
        if self.mode == "lite":
            return (x - _LITE_MEAN) / _LITE_STD
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="pipeline")
class PadToMultiple(keras.layers.Layer):
    """Pads images with zeros: `offset` rows and columns at the top and left, then at the bottom and
    right up to a multiple of `multiple` (the net's stride).

    FCN-32s sees any image size: padded to a multiple of 32, every feature cell covers a whole
    32 x 32 block, and `CropOrPad` takes the upsampled output back to the input size by keeping its
    top-left part. `offset` moves the image so that the feature cells' centres fall where the
    bilinear upsampling expects them (`pipeline.models.alignment_offset`): 0 for VGG16, 16 for
    MobileNet. Zero is the value after preprocessing (the mean colour for caffe preprocessing, mid
    grey for tf), as in the FCN reference's zero padding.

    Args:
        multiple: the stride to pad to.
        offset: rows and columns of zeros added at the top and left.
    """

    def __init__(self, multiple: int = 32, offset: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.multiple = int(multiple)
        self.offset = int(offset)

    def call(self, inputs):
        shape = ops.shape(inputs)
        pad_height = (self.multiple - (shape[1] + self.offset) % self.multiple) % self.multiple
        pad_width = (self.multiple - (shape[2] + self.offset) % self.multiple) % self.multiple
        padded = ops.pad(inputs, [[0, 0], [self.offset, pad_height], [self.offset, pad_width], [0, 0]])
        # TensorFlow's pad with computed sizes forgets even the channel count; restating it lets the
        # convolutions after it convert to LiteRT's built-in ops at any input size.
        return ops.reshape(padded, (-1, shape[1] + self.offset + pad_height, shape[2] + self.offset + pad_width,
                                    inputs.shape[-1]))

    def compute_output_shape(self, input_shape):
        rounded = lambda side: (None if side is None else  # noqa: E731
                                -(-(side + self.offset) // self.multiple) * self.multiple)
        return (input_shape[0], rounded(input_shape[1]), rounded(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple, "offset": self.offset}


@keras.saving.register_keras_serializable(package="pipeline")
class CropOrPad(keras.layers.Layer):
    """Crops (or zero-pads) `inputs[0]` at the bottom and right to the height and width of `inputs[1]`.

    Takes FCN scores, upsampled from the padded image, back to the input's size: output pixel (i, j)
    is input pixel (i, j) for every size. Pads too, for bases whose valid convolutions give fewer
    than size / 32 cells (Inception).
    """

    def call(self, inputs):
        x, reference = inputs
        height, width = ops.shape(reference)[1], ops.shape(reference)[2]
        shape = ops.shape(x)
        x = ops.pad(x, [[0, 0], [0, _at_least_zero(height - shape[1])], [0, _at_least_zero(width - shape[2])],
                        [0, 0]])
        return x[:, :height, :width, :]

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


def uint8_to_float32(images):
    """An explicit uint8 -> float32 cast at the top of an exported model.

    Without it `Resizing` keeps uint8 (rounding its result) when called eagerly, while in a graph
    Keras feeds it float32: the same model gave two answers. Float32 also under mixed precision,
    so the resize matches the float32 one the training data went through.
    """
    return ImagePreprocessing("none", dtype="float32", name="to_float32")(images)


def _at_least_zero(size):
    """max(size, 0) for a static int (JAX, known shapes) or a symbolic size (TensorFlow graphs)."""
    return max(size, 0) if isinstance(size, int) else ops.maximum(size, 0)


# Registers the bilinear upsampling layer and initializer too, so `import pipeline.layers` is all a
# user needs before loading any model.keras this project writes.
from pipeline.upsampling import BilinearInitializer, BilinearUpsampling  # noqa: E402,F401
