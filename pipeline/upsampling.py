"""Bilinear upsampling for FCN: a Conv2DTranspose initializer and a per-class (depthwise) layer.

Both forms compute, for every channel c, exactly
`skimage.transform.rescale(x[..., c], factor, order=1, mode="constant", cval=0, clip=False)`:
bilinear interpolation with pixel centres aligned (output pixel o samples input coordinate
(o + 0.5) / factor - 0.5) and zeros outside the input. Why that alignment holds:

- The FCN kernel has size k = 2f - f % 2 and centre c = f - 0.5 (even f) or f - 1 (odd f); its
  weights are w[j] = 1 - |j - c| / f, so the full ("valid") transposed convolution gives
  y_full[o'] = sum_i x[i] * tri((o' - c) / f - i), with tri(t) = max(0, 1 - |t|).
- skimage's bilinear rescale is y[o] = sum_i x[i] * tri((o + 0.5) / f - 0.5 - i).
- They agree for o' = o + floor(f / 2): crop floor(f / 2) pixels at the start and keep H * f.
  Keras's `padding="same"` crops exactly (k - f) // 2 = floor(f / 2) at the start, so a "same"
  transposed convolution with stride f needs no further crop (tests/test_upsampling.py sweeps
  f = 2..32 on non-square inputs against scikit-image, odd and even f alike).

Memory: the class-diagonal dense kernel of a `Conv2DTranspose(C, k, strides=f)` holds k*k*C*C
weights (k = 64 at f = 32: 1.8 M for 21 classes, 4.1 G, i.e. 16 GB in float32, for 1000 classes)
of which only k*k*C are non-zero. `BilinearUpsampling` keeps one k x k kernel per class
(k*k*C weights) and computes the same output.
"""

from __future__ import annotations

import numpy as np
import keras
from keras import ops


def bilinear_kernel_size(factor: int) -> int:
    """The FCN kernel size for an upsampling factor: 2f - f % 2 (64 for f = 32, 4 for f = 2, 5 for f = 3)."""
    _check_factor(factor)
    return 2 * factor - factor % 2


def factor_of_kernel_size(kernel_size: int) -> int:
    """Inverts `bilinear_kernel_size`: even k -> k / 2, odd k -> (k + 1) / 2."""
    if kernel_size < 2:
        raise ValueError(f"A bilinear upsampling kernel has size 2f - f % 2 >= 3; got {kernel_size}.")
    return kernel_size // 2 if kernel_size % 2 == 0 else (kernel_size + 1) // 2


def bilinear_filter(factor: int) -> np.ndarray:
    """The k x k bilinear kernel of the FCN reference's `upsample_filt` (float64)."""
    size = bilinear_kernel_size(factor)
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - np.abs(np.arange(size) - centre) / factor
    return np.outer(taps, taps)


def dense_kernel_weights(factor: int, num_classes: int) -> int:
    """Weights of the class-diagonal dense `Conv2DTranspose` kernel: k * k * C * C."""
    return bilinear_kernel_size(factor) ** 2 * num_classes**2


def per_class_kernel_weights(factor: int, num_classes: int) -> int:
    """Weights of the per-class (depthwise) kernel of `BilinearUpsampling`: k * k * C."""
    return bilinear_kernel_size(factor) ** 2 * num_classes


def _check_factor(factor: int) -> None:
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 2:
        raise ValueError(f"The upsampling factor must be an integer >= 2; got {factor!r}.")


@keras.saving.register_keras_serializable(package="pipeline")
class BilinearInitializer(keras.initializers.Initializer):
    """Sets a transposed-convolution kernel to bilinear interpolation, one channel to itself.

    The factor follows from the kernel size (k = 2f - f % 2 is one-to-one), so the initializer has
    no arguments and saves in `.keras` files as it is. Shapes:

    - `(k, k, C, C)`: a `Conv2DTranspose(C, k, strides=f, padding="same")` kernel; channel c maps
      to channel c only (the FCN reference's `surgery.interp`), every other entry is zero.
    - `(k, k, C)` or `(k, k, C, 1)`: one bilinear filter per channel (`BilinearUpsampling`).
    """

    def __call__(self, shape, dtype=None):
        shape = tuple(int(dimension) for dimension in shape)
        if len(shape) not in (3, 4) or shape[0] != shape[1]:
            raise ValueError(
                f"BilinearInitializer needs a square (k, k, C, C), (k, k, C, 1) or (k, k, C) kernel; "
                f"got shape {shape}."
            )
        bilinear = bilinear_filter(factor_of_kernel_size(shape[0]))
        if bilinear.shape[0] != shape[0]:  # cannot happen for k >= 2, kept as a guard
            raise ValueError(f"No bilinear factor has kernel size {shape[0]}.")
        if len(shape) == 3 or shape[3] == 1:
            kernel = np.broadcast_to(bilinear.reshape(bilinear.shape + (1,) * (len(shape) - 2)), shape)
        elif shape[2] == shape[3]:
            kernel = np.zeros(shape)
            channels = np.arange(shape[2])
            kernel[:, :, channels, channels] = bilinear[:, :, None]
        else:
            raise ValueError(
                f"A bilinear Conv2DTranspose kernel maps each channel to itself, so its filters must "
                f"equal its input channels; got kernel shape {shape} ({shape[3]} in, {shape[2]} out)."
            )
        return ops.convert_to_tensor(np.array(kernel), dtype=dtype or "float32")

    def get_config(self):
        return {}


@keras.saving.register_keras_serializable(package="pipeline")
class BilinearUpsampling(keras.layers.Layer):
    """Per-class (depthwise) transposed convolution with stride `factor`, initialised bilinear.

    Same output as `Conv2DTranspose(C, 2f - f % 2, strides=f, padding="same", use_bias=False,
    kernel_initializer=BilinearInitializer())`, but with one k x k kernel per channel: k*k*C weights
    instead of k*k*C*C. Keras has no depthwise transposed convolution, so it is computed in
    polyphase form: a transposed convolution with kernel k <= 2f gives each output pixel
    contributions from at most 2 x 2 input pixels, so every one of the f x f output phases is a
    2 x 2 depthwise convolution of the zero-padded input. One `depthwise_conv` with f*f channel
    multipliers computes all phases, a reshape interleaves them (depth-to-space) and a crop of
    floor(f / 2) aligns them as "same" padding does. It uses `keras.ops` only (any backend).

    Args:
        factor: the upsampling stride f (32 for FCN-32s).
        trainable: whether the kernel learns (the FCN reference keeps it fixed).
    """

    def __init__(self, factor: int = 32, **kwargs):
        super().__init__(**kwargs)
        _check_factor(factor)
        self.factor = int(factor)
        self.kernel_size = bilinear_kernel_size(self.factor)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("BilinearUpsampling needs a known number of channels (classes).")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.kernel_size, self.kernel_size, channels),
            initializer=BilinearInitializer(),
            trainable=True,  # the layer's own `trainable` flag decides
        )

    def call(self, inputs):
        f, size = self.factor, self.kernel_size
        x = ops.cast(inputs, self.compute_dtype)
        channels = self.kernel.shape[-1]
        kernel = ops.cast(self.kernel, self.compute_dtype)
        # Pad the kernel to 2f x 2f (odd f: one zero row/column), split each side into (tap, phase)
        # and reverse the taps: phase (r1, r2), tap (u1, u2) holds w[(1 - u1) f + r1, (1 - u2) f + r2].
        kernel = ops.pad(kernel, [[0, 2 * f - size], [0, 2 * f - size], [0, 0]])
        kernel = ops.reshape(kernel, (2, f, 2, f, channels))
        kernel = ops.flip(ops.flip(kernel, axis=0), axis=2)
        kernel = ops.reshape(ops.transpose(kernel, (0, 2, 4, 1, 3)), (2, 2, channels, f * f))
        # One zero on each side, then a valid 2 x 2 depthwise convolution: (H + 1) x (W + 1) phases.
        x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        phases = ops.depthwise_conv(x, kernel, strides=1, padding="valid")
        shape = ops.shape(phases)
        height, width = shape[1], shape[2]  # H + 1 and W + 1
        # Output channel c * f * f + r1 * f + r2 is phase (r1, r2) of class c: depth to space.
        phases = ops.reshape(phases, (-1, height, width, channels, f, f))
        phases = ops.transpose(phases, (0, 1, 4, 2, 5, 3))
        full = ops.reshape(phases, (-1, height * f, width * f, channels))
        start = f // 2
        return full[:, start : start + (height - 1) * f, start : start + (width - 1) * f, :]

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        scale = lambda side: None if side is None else side * self.factor  # noqa: E731
        return (batch, scale(height), scale(width), channels)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


AUTO_DENSE_LIMIT_BYTES = 16 << 20  # "auto" takes the dense kernel up to this size: 32 classes at f = 32


def bilinear_upsampling_layer(
    factor: int, num_classes: int, form: str = "auto", trainable: bool = False,
    name: str | None = None, dtype: str | None = None,
) -> keras.layers.Layer:
    """The bilinear x`factor` upsampling layer in the chosen form.

    Args:
        factor: stride f; the kernel is 2f - f % 2 wide.
        num_classes: channels C (the class scores).
        form: "per_class" (`BilinearUpsampling`, k*k*C weights), "dense" (a class-diagonal
            `Conv2DTranspose`, k*k*C*C weights, the FCN reference's form), or "auto": dense while
            its float32 kernel fits in 16 MiB (up to 32 classes at f = 32), per-class beyond. Same
            output; on CPU a training step through the dense kernel is faster (bench/fcn_step.py).
        trainable: learn the kernel, or keep it bilinear (the reference keeps it fixed).
        name: layer name.
        dtype: layer dtype policy (float32 keeps the scores exact under mixed precision).
    """
    if form == "auto":
        dense_bytes = dense_kernel_weights(factor, num_classes) * 4
        form = "dense" if dense_bytes <= AUTO_DENSE_LIMIT_BYTES else "per_class"
    if form == "per_class":
        return BilinearUpsampling(factor, trainable=trainable, name=name, dtype=dtype)
    if form == "dense":
        return keras.layers.Conv2DTranspose(
            num_classes, bilinear_kernel_size(factor), strides=factor, padding="same", use_bias=False,
            kernel_initializer=BilinearInitializer(), trainable=trainable, name=name, dtype=dtype,
        )
    raise ValueError(f"task.upsampling must be 'auto', 'per_class' or 'dense'; got {form!r}.")
