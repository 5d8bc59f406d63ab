"""MobileNetV2 1.0 with torchvision's padding, so torchvision's ImageNet weights give its exact outputs.

`keras.applications.MobileNetV2` pads each stride-2 3x3 convolution the TensorFlow way: (0, 1) on an
even side. torchvision pads (1, 1). With torchvision's weights the stock Keras model is close but not
equal (top-1 differs on some photos); this builder has the same layers and names as
`keras.applications.MobileNetV2(alpha=1.0)`, so the same `.weights.h5` files load into both, and a
`padding` switch: "torchvision" pads symmetrically, "keras" reproduces keras.applications exactly.
Only `keras.layers` are used, so it runs on every Keras backend.
"""

from __future__ import annotations

import keras
from keras import layers

# (expansion, output channels, stride) of the 17 inverted residual blocks, block_id 0..16.
_BLOCKS = (
    (1, 16, 1),
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)
PADDINGS = ("torchvision", "keras")


def _batch_norm(name: str) -> layers.BatchNormalization:
    # keras.applications' epsilon; the torchvision importer shifts the variance for torch's 1e-5.
    return layers.BatchNormalization(epsilon=1e-3, momentum=0.999, name=name)


def _stride_2_padding(x, padding: str, name: str):
    """Explicit zero padding before a stride-2 3x3 convolution with 'valid' padding."""
    if padding == "torchvision":
        return layers.ZeroPadding2D(1, name=name)(x)
    # keras.applications' imagenet_utils.correct_pad: (0, 1) on an even side, (1, 1) on odd or unknown.
    adjust = [1 - size % 2 if size is not None else 1 for size in x.shape[1:3]]
    return layers.ZeroPadding2D(((1 - adjust[0], 1), (1 - adjust[1], 1)), name=name)(x)


def _inverted_residual(inputs, expansion: int, filters: int, stride: int, block_id: int, padding: str):
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    x = inputs
    if block_id:
        x = layers.Conv2D(expansion * inputs.shape[-1], 1, use_bias=False, name=f"{prefix}expand")(x)
        x = _batch_norm(f"{prefix}expand_BN")(x)
        x = layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
    if stride == 2:
        x = _stride_2_padding(x, padding, f"{prefix}pad")
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid", use_bias=False,
                               name=f"{prefix}depthwise")(x)
    x = _batch_norm(f"{prefix}depthwise_BN")(x)
    x = layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}project")(x)
    x = _batch_norm(f"{prefix}project_BN")(x)
    if stride == 1 and inputs.shape[-1] == filters:
        x = layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def MobileNetV2(
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    padding: str = "torchvision",
    name: str = "mobilenetv2_1.00",
) -> keras.Model:
    """MobileNetV2 1.0 with the layer names of `keras.applications.MobileNetV2`.

    Args:
        include_top: end with global average pooling and the `predictions` dense layer; otherwise
            end at `out_relu` (stride 32, 1280 channels).
        weights: None (random) or the path of a `.weights.h5` file for this model; there is no
            download: torchvision's ImageNet weights come from
            `pipeline.importers.pytorch.mobilenet_v2_weights`.
        input_shape: `(height, width, 3)`; None accepts any size.
        classes: outputs of `predictions`.
        classifier_activation: activation of `predictions` ("softmax" or None for logits).
        padding: "torchvision" (stride-2 3x3 convolutions pad 1 on every side, as torch does) or
            "keras" (TensorFlow 'same': equal to keras.applications.MobileNetV2).
        name: model name.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}.")
    if weights == "imagenet":
        raise ValueError(
            "pipeline.mobilenet_v2.MobileNetV2 downloads nothing: pass weights=None or the path of a "
            ".weights.h5 file, e.g. pipeline.importers.pytorch.mobilenet_v2_weights(cache_dir, include_top) "
            "(torchvision's ImageNet weights from a pip package), or use backbone=mobilenet_v2_torchvision."
        )
    inputs = keras.Input(input_shape or (None, None, 3), name="input_layer")
    if padding == "torchvision":
        x = layers.ZeroPadding2D(1, name="Conv1_pad")(inputs)
        x = layers.Conv2D(32, 3, strides=2, padding="valid", use_bias=False, name="Conv1")(x)
    else:
        x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="Conv1")(inputs)
    x = _batch_norm("bn_Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    for block_id, (expansion, filters, stride) in enumerate(_BLOCKS):
        x = _inverted_residual(x, expansion, filters, stride, block_id, padding)
    x = layers.Conv2D(1280, 1, use_bias=False, name="Conv_1")(x)
    x = _batch_norm("Conv_1_bn")(x)
    x = layers.ReLU(6.0, name="out_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
