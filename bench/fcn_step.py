"""Benchmark: FCN-32s training step time, the pipeline's model against the same net in plain Keras.

The pipeline's model is `task=fcn32` from the composed `conf/train.yaml`, compiled as
`pipeline.run.train` compiles it (its loss, its `metrics()`, the configured optimizer). The
baseline is the same net written here in plain Keras: the keras.applications base cut at its
stride-32 layer, 1x1 class scores, a fixed bilinear `Conv2DTranspose(kernel 64, stride 32)` and a
crop to the input size, compiled with the same loss and plain accuracy. The pipeline pads
MobileNet's input by 16 pixels at the top-left (and to a multiple of 32) so the upsampled cells
align with the pixels (`pipeline.models.alignment_offset`); the baseline pads the same way,
and an unpadded plain-Keras row shows what that alignment costs. The pipeline's default
upsampling (`auto`) is the reference's dense Conv2DTranspose at 21 classes; a
`task.upsampling=per_class` row shows its per-class layer (k*k*C weights), which `auto` takes
beyond 32 classes.

All models train on the same random in-memory batches (`tf.data` from tensors, repeated) with a
frozen base, as the task's default `trainable_layers: 0` has it. A step's time is an epoch of
`--steps` steps divided by the steps; the first epoch of every fit (tracing, warm-up) is left
out. Fits alternate between the models over the repeats. Weights do not change the step time,
so the base is randomly initialised (`backbone.weights=null`).

    python bench/fcn_step.py --size 224 --batch-size 4 --steps 10 --epochs 3 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import pipeline.schema  # noqa: E402,F401
from common import machine  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
CLASSES = 21  # PASCAL VOC
FACTOR = 32
BASELINE = "plain Keras FCN-32s (same padding)"


class StepTimer(keras.callbacks.Callback):
    """Records each epoch's seconds per training step (no validation runs, so begin to end is training)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append((time.perf_counter() - self.start) / self.steps)


def bilinear_kernel(classes: int) -> np.ndarray:
    """The FCN reference's `upsample_filt` for x32 (64 x 64) on the class diagonal: class c -> class c."""
    size = 2 * FACTOR
    taps = 1 - np.abs(np.arange(size) - (FACTOR - 0.5)) / FACTOR
    kernel = np.zeros((size, size, classes, classes), dtype="float32")
    kernel[:, :, np.arange(classes), np.arange(classes)] = np.outer(taps, taps)[:, :, None]
    return kernel


def keras_model(size: int, pad: int) -> keras.Model:
    """FCN-32s on MobileNet v1 in plain Keras, compiled with the loss and plain accuracy.

    Args:
        size: the square input side, a multiple of 32.
        pad: zero pixels added on every side before the base and cropped off the scores at the
            bottom and right, as the pipeline's `PadToMultiple(32, offset=16)` and `CropOrPad` do
            for a side that is a multiple of 32 (16 at the top-left, 16 more to reach a multiple).
    """
    padded = size + 2 * pad
    mobilenet = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(padded, padded, 3))
    base = keras.Model(mobilenet.input, mobilenet.get_layer("conv_pw_13_relu").output)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNet's [-1, 1]
    if pad:
        x = keras.layers.ZeroPadding2D(pad)(x)
    x = base(x, training=False)
    x = keras.layers.Conv2D(CLASSES, 1, kernel_initializer="zeros")(x)
    x = keras.layers.Conv2DTranspose(CLASSES, 2 * FACTOR, strides=FACTOR, padding="same", use_bias=False,
                                     kernel_initializer=keras.initializers.Constant(bilinear_kernel(CLASSES)),
                                     trainable=False)(x)
    if pad:
        x = keras.layers.Cropping2D(((0, 2 * pad), (0, 2 * pad)))(x)
    model = keras.Model(inputs, keras.layers.Softmax()(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(ignore_class=255), metrics=["accuracy"])
    return model


def pipeline_model(work: Path, size: int, batch_size: int, overrides: list[str]) -> keras.Model:
    """The fcn32 task's model, compiled as `pipeline.run.train` compiles it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.root={work}", f"paths.output_dir={work / 'run'}", f"paths.resume_dir={work / 'resume'}",
            "task=fcn32", "dataset=voc_demo", "backbone=mobilenet_v1", "backbone.weights=null",
            f"image_size=[{size},{size}]", f"batch_size={batch_size}", *overrides])
    task = instantiate(cfg.task)
    model = task.build_model()
    model.compile(optimizer=instantiate(cfg.optimizer, _convert_="all"), loss=task.loss, metrics=task.metrics(),
                  jit_compile=cfg.jit_compile)
    return model


def batches(size: int, batch_size: int) -> tf.data.Dataset:
    """Four different random batches, repeated: pixels in [0, 255], labels 0..20 with 5 % ignored (255)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(4 * batch_size, size, size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, size=(4 * batch_size, size, size)).astype("int32")
    labels[rng.random(labels.shape) < 0.05] = 255
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True).repeat()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="square input side, a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per fit (one more is warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.size % FACTOR:
        parser.error(f"--size must be a multiple of {FACTOR}; got {args.size}.")

    keras.utils.set_random_seed(0)  # the same initial weights every run
    work = Path(tempfile.mkdtemp(prefix="bench-fcn-"))
    pad = FACTOR // 2  # pipeline.models.alignment_offset of MobileNet v1
    models = {
        BASELINE: keras_model(args.size, pad),
        "plain Keras, no alignment padding": keras_model(args.size, 0),
        "pipeline fcn32 (default upsampling=auto: dense at 21 classes)":
            pipeline_model(work, args.size, args.batch_size, []),
        "pipeline fcn32, task.upsampling=per_class": pipeline_model(work, args.size, args.batch_size,
                                                                    ["task.upsampling=per_class"]),
    }
    shutil.rmtree(work, ignore_errors=True)  # the VOC demo the task's dataset wrote; the models are built
    data = batches(args.size, args.batch_size)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            timer = StepTimer(args.steps)
            model.fit(data, steps_per_epoch=args.steps, epochs=args.epochs + 1, callbacks=[timer], verbose=0,
                      shuffle=False)
            times[name] += timer.seconds[1:]

    baseline = statistics.median(times[BASELINE])
    print(f"# FCN-32s training step, MobileNet v1 (frozen base), {args.size}x{args.size}, batch {args.batch_size}, "
          f"{CLASSES} classes, median of {args.repeats} x {args.epochs} epochs of {args.steps} steps")
    print(machine(tensorflow=tf.__version__, keras=keras.__version__))
    print("| model | metrics | XLA | median step (ms) | min-max (ms) | vs plain Keras |")
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        median = statistics.median(times[name])
        metrics = ", ".join(metric for metric in model.get_metrics_result() if metric != "loss")
        print(f"| {name} | {metrics} | {model.jit_compile} | {median * 1e3:.0f} | "
              f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
