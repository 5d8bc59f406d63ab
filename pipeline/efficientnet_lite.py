"""EfficientNet-Lite0, which keras.applications lacks: EfficientNet-B0's blocks made quantization-friendly.

The Lite variants (TensorFlow TPU repository, `efficientnet/lite`) drop squeeze-and-excitation, use
ReLU6 instead of swish, and keep the 32-channel stem and 1280-channel head unscaled. Convolutions pad
TensorFlow's 'same' way, BatchNorm epsilon is 1e-3, and inputs are `(x - 127) / 128`
(`ImagePreprocessing("lite")`). Layer names follow `keras.applications.EfficientNetB0` (`stem_conv`,
`block2a_expand_conv`, `top_activation`, `predictions`). Only `keras.layers` are used, so it runs on
every Keras backend.
"""

from __future__ import annotations

import string

import keras
from keras import layers

# EfficientNet-B0's stages, unscaled for Lite0: (repeats, kernel size, stride, expansion, output channels).
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def block_names() -> list[str]:
    """Keras name prefix of each of the 16 blocks in order: block1a, block2a, block2b, ..., block7a."""
    return [f"block{stage + 1}{string.ascii_lowercase[i]}_"
            for stage, (repeats, *_) in enumerate(_STAGES) for i in range(repeats)]


def _batch_norm(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=name)


def _mobile_inverted_block(inputs, prefix: str, kernel_size: int, stride: int, expansion: int, filters: int,
                           drop_rate: float):
    x = inputs
    if expansion != 1:
        x = layers.Conv2D(inputs.shape[-1] * expansion, 1, padding="same", use_bias=False,
                          name=f"{prefix}expand_conv")(x)
        x = _batch_norm(f"{prefix}expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{prefix}expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel_size, strides=stride, padding="same", use_bias=False,
                               name=f"{prefix}dwconv")(x)
    x = _batch_norm(f"{prefix}bn")(x)
    x = layers.ReLU(6.0, name=f"{prefix}activation")(x)
    x = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{prefix}project_conv")(x)
    x = _batch_norm(f"{prefix}project_bn")(x)
    if stride == 1 and inputs.shape[-1] == filters:
        if drop_rate > 0:  # stochastic depth: drops the whole residual branch, only in training
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}drop")(x)
        x = layers.Add(name=f"{prefix}add")([x, inputs])
    return x


def EfficientNetLite0(
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    dropout_rate: float = 0.2,
    drop_connect_rate: float = 0.2,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """EfficientNet-Lite0 (4.7 M parameters, 224x224), as a Functional model with named layers.

    Args:
        include_top: end with pooling, dropout and the `predictions` dense layer; otherwise end at
            `top_activation` (stride 32, 1280 channels).
        weights: None (random) or the path of a `.weights.h5` file for this model; the ImageNet weights
            come from `pipeline.importers.pytorch.efficientnet_lite0_weights` (nothing is downloaded).
        input_shape: `(height, width, 3)`; None accepts any size.
        classes: outputs of `predictions`.
        classifier_activation: activation of `predictions` ("softmax" or None for logits).
        dropout_rate: dropout before `predictions`.
        drop_connect_rate: stochastic depth of the last block (earlier blocks get proportionally less).
        name: model name.
    """
    if weights == "imagenet":
        raise ValueError(
            "pipeline.efficientnet_lite.EfficientNetLite0 downloads nothing: pass weights=None or the path "
            "of a .weights.h5 file, e.g. pipeline.importers.pytorch.efficientnet_lite0_weights(cache_dir, "
            "include_top), or use backbone=efficientnet_lite0."
        )
    inputs = keras.Input(input_shape or (None, None, 3), name="input_layer")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _batch_norm("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    prefixes = iter(block_names())
    total = sum(repeats for repeats, *_ in _STAGES)
    index = 0
    for repeats, kernel_size, stride, expansion, filters in _STAGES:
        for repeat in range(repeats):
            x = _mobile_inverted_block(x, next(prefixes), kernel_size, stride if repeat == 0 else 1, expansion,
                                       filters, drop_connect_rate * index / total)
            index += 1

    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _batch_norm("top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
