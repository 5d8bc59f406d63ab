"""Benchmark: images per second on a GPU for transfer learning and FCN-32s, under Keras's JAX backend.

The GPU machines have JAX but no TensorFlow, so this script builds the pipeline's own models
(`pipeline.models`, backbones from `conf/backbone/*.yaml`) with `keras.layers` only and feeds them
in-memory batches already on the device: the figures are the models' speed, not the input path's.
XLA compiles every step (JAX always does; `jit_compile=True`), under the chosen precision policy.

Transfer learning, per backbone: the keras-io way trains with the frozen base inside the model
(every epoch runs the base); ours runs the base once per image to cache features, then trains the
head on features. FCN-32s: a whole-network training step at `--fcn-size`, with the reference's
convolutionalised fc6/fc7 on VGG16.

    KERAS_BACKEND=jax python bench/gpu_throughput.py --precision mixed_bfloat16

On the lent GPU machine (`device` tool; no network there), carry the wheels it lacks:
`make gpu-wheels` here, then run with `carry: [".gpu-wheels"]`:

    python3 -m pip install -q --no-index --find-links .gpu-wheels keras hydra-core \
      && KERAS_BACKEND=jax python3 bench/gpu_throughput.py

Published figures to set beside these are in bench/RESULTS.md, with their hardware.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.models import classification_head, fcn32s  # noqa: E402

# The reference recipe's convolutionalised fc6/fc7, as the VOC experiment states them.
VGG16_FC = OmegaConf.to_container(
    OmegaConf.load(ROOT / "conf" / "experiment" / "voc_fcn32s_vgg16.yaml").task.classifier_layers)


def backbone(name: str):
    """The `pipeline.backbones.Backbone` of conf/backbone/NAME.yaml, randomly initialised.

    Weights do not change speed, and the machine cannot download ImageNet weights.
    """
    facts = OmegaConf.load(ROOT / "conf" / "backbone" / f"{name}.yaml")
    facts.weights, facts.imagenet_weights, facts.checkpoint_importer = None, None, None
    return instantiate(facts)


def images_per_second(step, batch: int, steps: int, repeats: int) -> float:
    """Median over `repeats` blocks of `steps` calls of `step` (which waits for its result)."""
    for _ in range(3):  # compile and warm up
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def transfer(name: str, batch: int, classes: int, steps: int, repeats: int) -> list[tuple]:
    """keras-io training step, feature caching, and the head's step on cached features."""
    spec = backbone(name)
    size = spec.input_size
    images = keras.random.uniform((batch, *size, 3), 0, 255, seed=0)
    labels = keras.random.randint((batch,), 0, classes, seed=1)

    extractor = spec.feature_extractor(list(size))
    features = extractor.predict_on_batch(images)
    head = classification_head(features.shape[1:], classes, dropout_rate=0.2, pooling="avg")
    inputs = keras.Input((*size, 3))
    keras_io = keras.Model(inputs, head(extractor(inputs)))
    for model in (keras_io, head, extractor):
        model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    features = keras.ops.convert_to_tensor(features)

    rows = [
        (name, "keras-io training step (base every epoch)",
         images_per_second(lambda: keras_io.train_on_batch(images, labels), batch, steps, repeats)),
        (name, "feature caching (base once per image)",
         images_per_second(lambda: extractor.predict_on_batch(images), batch, steps, repeats)),
        (name, "head training step on cached features",
         images_per_second(lambda: head.train_on_batch(features, labels), batch, steps * 10, repeats)),
    ]
    keras.backend.clear_session()
    return [(*row, row[2] / rows[0][2]) for row in rows]


def fcn(name: str, batch: int, size: int, classes: int, steps: int, repeats: int) -> list[tuple]:
    """FCN-32s training step, the whole network trained (as the reference recipe)."""
    spec = backbone(name)
    base = spec.build([None, None])
    base.trainable = True
    model = fcn32s(base, classes, spec.preprocessing, VGG16_FC if name == "vgg16" else [],
                   frozen_statistics=True, name=f"{name}_fcn32s")
    model.compile(keras.optimizers.SGD(1e-4, momentum=0.9), "sparse_categorical_crossentropy",
                  jit_compile=True)
    images = keras.random.uniform((batch, size, size, 3), 0, 255, seed=0)
    masks = keras.random.randint((batch, size, size), 0, classes, seed=1)
    rate = images_per_second(lambda: model.train_on_batch(images, masks), batch, steps, repeats)
    keras.backend.clear_session()
    return [(name, f"FCN-32s training step {size}x{size}", rate, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="mixed_bfloat16",
                        help="Keras dtype policy: float32, mixed_float16 or mixed_bfloat16")
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--fcn-backbones", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fcn-batch-size", type=int, default=16)
    parser.add_argument("--fcn-size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    keras.mixed_precision.set_global_policy(args.precision)
    rows = []
    for name in args.backbones:
        rows += transfer(name, args.batch_size, args.classes, args.steps, args.repeats)
    for name in args.fcn_backbones:
        rows += fcn(name, args.fcn_batch_size, args.fcn_size, args.classes, args.steps, args.repeats)

    device = keras.backend.backend()
    if device == "jax":
        import jax

        device = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
    print(f"# in-memory batches, {args.precision}, XLA; transfer batch {args.batch_size} at the backbone's "
          f"input size, FCN-32s batch {args.fcn_batch_size}; medians of {args.repeats}")
    print(f"# {platform.node()} | {device} | python {platform.python_version()} | keras {keras.__version__} "
          f"| numpy {np.__version__}")
    print("| backbone | what | images/s | vs keras-io step |")
    print("|---|---|---|---|")
    for name, what, rate, ratio in rows:
        print(f"| {name} | {what} | {rate:,.1f} | {'-' if ratio is None else f'{ratio:.1f}x'} |")


if __name__ == "__main__":
    main()
