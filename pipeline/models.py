"""The models, in `keras.layers` and `keras.ops` alone: they build and run on any Keras backend.

The tasks feed them with `tf.data`; `bench/gpu_throughput.py` runs them under JAX, where
TensorFlow is not installed.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.layers import CropOrPad, ImagePreprocessing, PadToMultiple
from pipeline.upsampling import bilinear_upsampling_layer

STRIDE = 32  # pixels per cell of the feature layer every backbone here is cut at


def classification_head(
    feature_shape: tuple[int, ...], num_classes: int, dropout_rate: float, pooling: str
) -> keras.Model:
    """Pooling, batch normalisation, dropout and a softmax dense layer (float32 from the normalisation on).

    The normalisation makes the head indifferent to the scale of the backbone's features: ReLU6
    bases (MobileNet) give pooled values in [0, 6], HED's VGG16 up to several hundred, where a bare
    dense layer starts with logits in the hundreds, an epoch-1 loss above 10, and ends 10 epochs at
    a training accuracy of 0.7. Per channel, as scikit-learn's StandardScaler before a logistic
    regression: LayerNormalization (per example, over channels) keeps the channels' unequal scales
    and still trained HED's features to only 0.8. Its moving statistics use momentum 0.9 rather than
    Keras's 0.99, so they have settled after the few dozen steps of a transfer run, and are
    synchronised over replicas (TensorFlow), so `mirrored` trains exactly as one device does. In
    float32: squares of values in the hundreds overflow float16.

    Args:
        feature_shape: `(height, width, channels)` of the base's feature maps.
        num_classes: outputs of the softmax.
        dropout_rate: dropout before the dense layer.
        pooling: "avg" or "max" over the feature map.
    """
    pools = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    if pooling not in pools:
        raise ValueError(f"task.pooling must be 'avg' or 'max'; got {pooling!r}.")
    features = keras.Input(feature_shape, name="features")
    x = pools[pooling](name="pool")(features)
    x = keras.layers.BatchNormalization(momentum=0.9, synchronized=keras.backend.backend() == "tensorflow",
                                        dtype="float32", name="normalization")(x)
    x = keras.layers.Dropout(dropout_rate, dtype="float32", name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(features, outputs, name="head")


def fcn32s(
    base: keras.Model,
    num_classes: int,
    preprocessing: str,
    classifier_layers: list[dict] = (),
    upsampling: str = "auto",
    trainable_upsampling: bool = False,
    score_initializer: str = "zeros",
    frozen_statistics: bool = True,
    name: str = "fcn32s",
) -> keras.Model:
    """FCN-32s: float RGB `[batch, height, width, 3]` of any size -> class probabilities of that size.

    The image is padded at the bottom and right to a multiple of 32 (and at the top-left by the
    base's `alignment_offset`), and the x32 bilinear scores are cropped back to the input size.
    Class scores, upsampling and softmax run in float32, also under mixed precision.

    Args:
        base: the backbone cut at its stride-32 feature layer, built for inputs of any size.
        num_classes: classes to score, background included.
        preprocessing: the `ImagePreprocessing` mode of the base's weights.
        classifier_layers: convolutions before the class scores, each a dict with `name`,
            `filters`, `kernel_size` and `dropout_rate`.
        upsampling: "auto", "per_class" (k*k*C weights) or "dense" (the reference's k*k*C*C
            kernel); see `pipeline.upsampling.bilinear_upsampling_layer`.
        trainable_upsampling: learn the bilinear kernel (the reference keeps it fixed).
        score_initializer: initializer of the 1x1 class-score convolution.
        frozen_statistics: call the base with `training=False`, so pretrained BatchNorm statistics
            stay in inference mode also when its layers are unfrozen (False: train from scratch).
        name: the model's name.
    """
    inputs = keras.Input((None, None, 3), name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs)
    x = PadToMultiple(STRIDE, alignment_offset(base), name="pad_to_32")(x)
    x = base(x, training=False) if frozen_statistics else base(x)
    for spec in classifier_layers:
        x = keras.layers.Conv2D(spec["filters"], spec["kernel_size"], padding="same", activation="relu",
                                name=spec["name"])(x)
        if spec.get("dropout_rate"):
            x = keras.layers.Dropout(spec["dropout_rate"], name=f"{spec['name']}_dropout")(x)
    x = keras.layers.Conv2D(num_classes, 1, kernel_initializer=score_initializer, dtype="float32",
                            name="class_scores")(x)
    x = bilinear_upsampling_layer(STRIDE, num_classes, upsampling, trainable_upsampling,
                                  name="upsample_32x", dtype="float32")(x)
    x = CropOrPad(dtype="float32", name="crop_to_input")([x, inputs])
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def feature_grid(model: keras.Model) -> tuple[tuple[int, int], tuple[float, float]]:
    """Where a fully convolutional model's output cells sit on its input, from its layers' geometry.

    Walks from the output back to the input through each layer's first input and composes the
    convolutions, poolings, paddings and croppings: output cell (i, j) has its receptive field
    centred on input pixel (stride_y * i + centre_y, stride_x * j + centre_x), for inputs whose
    sides are multiples of the stride (TensorFlow's "same" padding then pads (k - s) // 2 before).

    Args:
        model: e.g. the base cut at its stride-32 layer.

    Returns:
        ((stride_y, stride_x), (centre_y, centre_x)) of cell (0, 0), in input pixels.
    """
    memo: dict[int, tuple] = {}

    def grid(tensor) -> tuple:
        if id(tensor) not in memo:
            operation, node_index, _ = tensor._keras_history
            node = operation._inbound_nodes[node_index]
            if not node.input_tensors:  # the Input
                memo[id(tensor)] = ((1, 1), (0.0, 0.0))
            else:
                memo[id(tensor)] = _layer_grid(operation, *grid(node.input_tensors[0]))
        return memo[id(tensor)]

    return grid(model.outputs[0])


def _layer_grid(layer, strides: tuple, centres: tuple) -> tuple:
    if isinstance(layer, keras.Model):  # a nested base: compose its own grid
        (inner_strides, inner_centres) = feature_grid(layer)
        return (tuple(s * i for s, i in zip(strides, inner_strides)),
                tuple(c + s * i for c, s, i in zip(centres, strides, inner_centres)))
    config = layer.get_config()
    if isinstance(layer, (keras.layers.ZeroPadding2D, keras.layers.Cropping2D)):
        sign = -1 if isinstance(layer, keras.layers.ZeroPadding2D) else 1
        before = [side[0] for side in config["padding" if sign < 0 else "cropping"]]
        return strides, tuple(c + sign * s * b for c, s, b in zip(centres, strides, before))
    kernel = config.get("kernel_size") or config.get("pool_size")
    if kernel is None or "strides" not in config or config.get("data_format") == "channels_first":
        return strides, centres  # activations, normalisation, adds, concatenations: no move
    layer_strides = config["strides"] or kernel
    dilation = config.get("dilation_rate") or (1, 1)
    new_strides, new_centres = [], []
    for k, step, d, stride, centre in zip(kernel, layer_strides, dilation, strides, centres):
        k = d * (k - 1) + 1
        before = max(k - step, 0) // 2 if config.get("padding") == "same" else 0
        new_strides.append(stride * step)
        new_centres.append(centre + stride * (-before + (k - 1) / 2))
    return tuple(new_strides), tuple(new_centres)


def alignment_offset(base: keras.Model) -> int:
    """Zero rows and columns to pad at the top-left so the base's cells sit where upsampling expects.

    The "same" x32 bilinear upsampling (exactly scikit-image's rescale) puts cell i's value at
    pixel 32 i + 15.5. VGG16's symmetric 3x3 convolutions and 2x2 poolings put its receptive field
    there: offset 0. Bases whose stride-2 convolutions pad only after (MobileNet v1/v2,
    EfficientNet) centre cell i on 32 i + 31: padding 16 at the top-left moves the image so the
    centres fall on 32 i + 15 of the original, half a pixel from exact. Offsets are taken modulo
    32 (a whole cell just renumbers the cells).

    Args:
        base: the backbone cut at its stride-32 feature layer.
    """
    strides, centres = feature_grid(base)
    if strides != (STRIDE, STRIDE):
        raise ValueError(f"FCN-32s needs a stride-32 feature layer; {base.name}'s output has stride "
                         f"{strides}. Set backbone.feature_layer to its stride-32 layer.")
    offsets = {round((centre - (STRIDE - 1) / 2) % STRIDE) % STRIDE for centre in centres}
    if len(offsets) != 1:
        raise ValueError(f"{base.name} centres its cells differently along height and width ({centres}).")
    return offsets.pop()


def classifier_kernel(kernel: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A classifier's kernel as a `(k, k, in, out)` convolution kernel.

    A Dense kernel `(k*k*in, out)` that read a flattened `k x k x in` map (channels last) becomes the
    k x k convolution that computes the same thing at every position; a convolution kernel of the
    same number of weights is reshaped (a 1x1 `conv_preds` onto a 1x1 layer).

    Args:
        kernel: the classifier layer's kernel.
        shape: the convolution's kernel shape.
        name: the convolution, for the error message.
    """
    shape = tuple(int(side) for side in shape)
    if kernel.size != int(np.prod(shape)) or kernel.shape[-1] != shape[-1]:
        raise ValueError(f"Cannot initialise {name} (kernel {shape}) from a classifier kernel of shape "
                         f"{kernel.shape}: set its filters and kernel_size to match.")
    return kernel.reshape(shape)
