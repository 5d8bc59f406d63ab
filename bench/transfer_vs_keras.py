"""Benchmark: bottleneck-cached transfer learning against the plain-Keras way, in one run.

The plain-Keras way is the keras-io transfer-learning guide: the frozen base sits inside the model,
so every epoch runs it again on every image. Ours computes each image's features once (cold cache)
or not at all (warm cache, a second run). Same images, same MobileNet v1 ImageNet base, same head,
same epochs; wall time of the whole training and test prediction. Repeats and prints medians,
under each Keras backend (TensorFlow and JAX, each in its own process) with the ratio between them.

    python bench/transfer_vs_keras.py --images 120 --epochs 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
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
import tensorflow as tf  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import pipeline.schema  # noqa: E402,F401
from pipeline.data import decode_image  # noqa: E402
from pipeline.demo import ensure_demo_folder  # noqa: E402
from pipeline.layers import ImagePreprocessing  # noqa: E402
from pipeline.run import train  # noqa: E402
from common import add_backend_arguments, jax_version, machine, subset, times_per_backend  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
KERAS_IO = "keras-io (base every epoch)"


def pipeline_run(data: Path, work: Path, epochs: int, batch_size: int, run: str) -> float:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.root={work}", f"paths.output_dir={work / run}", f"paths.resume_dir={work / 'resume'}",
            f"paths.cache_dir={work / 'cache'}", "dataset=folder", f"dataset.root={data}",
            f"epochs={epochs}", f"batch_size={batch_size}", "verbose=0", "callbacks=minimal",
            "resume=false"])
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def keras_io_run(data: Path, weights: str, epochs: int, batch_size: int) -> float:
    """The keras-io guide's model: frozen base inside, fit on images, then predict the test split."""
    start = time.perf_counter()
    keras.backend.clear_session()
    classes = sorted(p.name for p in data.iterdir())
    paths = [str(p) for c in classes for p in sorted((data / c).iterdir())]
    labels = [classes.index(Path(p).parent.name) for p in paths]

    def load(path, label):
        image = tf.cast(decode_image(tf.io.read_file(path)), tf.float32)
        return tf.image.resize(image, (224, 224)), label

    images = tf.data.Dataset.from_tensor_slices((paths, labels)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    train_images = images.shuffle(len(paths), seed=0).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    base = keras.applications.MobileNet(include_top=False, weights=weights, input_shape=(224, 224, 3))
    base.trainable = False
    inputs = keras.Input((224, 224, 3))
    x = base(ImagePreprocessing("tf")(inputs), training=False)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Dense(len(classes), activation="softmax")(x))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_images, epochs=epochs, verbose=0)
    model.predict(images.batch(batch_size), verbose=0)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Every run's wall times under this process's Keras backend."""
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    data = subset(ensure_demo_folder(str(CONF.parent / "datasets" / "demo")), work / "data", args.images)
    from pipeline.importers.slim import mobilenet_v1_weights

    weights = mobilenet_v1_weights(str(CONF.parent / ".cache" / "weights"))
    times = {KERAS_IO: [], "pipeline, cold cache": [], "pipeline, warm cache": []}
    for repeat in range(args.repeats):
        shutil.rmtree(work / "cache" / "features", ignore_errors=True)  # keep the converted weights
        times[KERAS_IO].append(keras_io_run(data, weights, args.epochs, args.batch_size))
        times["pipeline, cold cache"].append(pipeline_run(data, work, args.epochs, args.batch_size, f"cold{repeat}"))
        times["pipeline, warm cache"].append(pipeline_run(data, work, args.epochs, args.batch_size, f"warm{repeat}"))
    shutil.rmtree(work, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=456, help="of the demo set (456: all of it)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    add_backend_arguments(parser)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args)))
        return

    argv = [f"--images={args.images}", f"--epochs={args.epochs}", f"--batch-size={args.batch_size}",
            f"--repeats={args.repeats}"]
    times = times_per_backend(__file__, argv, args.backends)
    print(f"# transfer learning: {args.images} images, {args.epochs} epochs, batch {args.batch_size}, "
          f"MobileNet v1 224x224, median of {args.repeats}; each backend in its own process")
    print(machine(tensorflow=tf.__version__, keras=keras.__version__, jax=jax_version()))
    first = args.backends[0]
    print("| backend | run | median wall time (s) | all runs (s) | speed-up vs keras-io (same backend) | "
          f"time vs {first} |")
    print("|---|---|---|---|---|---|")
    for backend, runs in times.items():
        baseline = statistics.median(runs[KERAS_IO])
        for name, values in runs.items():
            median = statistics.median(values)
            print(f"| {backend} | {name} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
                  f"{baseline / median:.1f}x | {median / statistics.median(times[first][name]):.2f}x |")


if __name__ == "__main__":
    main()
