"""Benchmark: images per second from JPEG files into the frozen backbone, against in-memory tensors.

The files cases are the classification task's own input path, `ClassificationTask.datasets`: file
names shuffled, then read, decoded, turned upright by EXIF, resized by the task's resize layer,
batched and prefetched (one case also applies the task's default augmentation to each batch). The
model is the task's own: ImagePreprocessing, the frozen MobileNet v1 base and the head, called by
`model.predict` (a compiled graph, no XLA: XLA is about 6x slower for MobileNet on CPU). The
baseline is the same model predicting the same images already decoded and resized, held in memory.
busy = files rate / in-memory rate: the share of its in-memory speed the model keeps when it reads
files (target: at least 90 %). The input pipeline alone, iterated without a model, shows the
headroom. One pass is what `model.fit` iterates for `--epochs` epochs (`TaskData.train(0, epochs)`,
built once), so tf.data's start-up, about half a second per iterator here, is paid once per pass
as it is once per `fit`. Random weights (`backbone.weights=null`): speed does not depend on them.
Cases alternate within each repeat. Each ratio is taken within one repeat, against the baseline
measured seconds before, and the median of those is printed: on a shared machine the load changes
between repeats, and a ratio of two medians would mix loads.

    python bench/input_pipeline.py --images 200 --epochs 2 --repeats 5
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
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import pipeline.schema  # noqa: E402,F401
from pipeline.demo import ensure_demo_folder  # noqa: E402
from pipeline.tasks.classification import ClassificationTask  # noqa: E402
from common import machine, subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JPEG_EXTENSIONS = (".jpg", ".jpeg")


def classification_task(data: Path, work: Path, augmentation: bool) -> ClassificationTask:
    """The task as `python train.py task=classification dataset=folder dataset.root=DATA` builds it."""
    overrides = ["task=classification", "dataset=folder", f"dataset.root={data}", "backbone.weights=null",
                 f"paths.root={work}"]
    if not augmentation:
        overrides.append("task.augmentation=null")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return instantiate(compose("train", overrides=overrides).task)


def images_per_second(run: Callable[[], None], images: int) -> float:
    start = time.perf_counter()
    run()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="JPEG files to copy; about 80 %% are training")
    parser.add_argument("--epochs", type=int, default=2, help="epochs in one timed pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", type=Path, help="a folder-per-class image set to read instead of the demo photos")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # the machine may be shared: a busy one makes every rate noisy
    work = Path(tempfile.mkdtemp(prefix="bench-input-"))
    source = args.root or Path(ensure_demo_folder(str(ROOT / "datasets" / "demo")))
    # JPEG only, so every file goes through the JPEG decoder (the demo set also holds a few PNGs).
    data = subset(source, work / "data", args.images, extensions=JPEG_EXTENSIONS)
    plain = classification_task(data, work, augmentation=False)
    augmented = classification_task(data, work, augmentation=True)
    model = plain.build_model()
    plain_data, augmented_data = plain.datasets(args.batch_size), augmented.datasets(args.batch_size)
    files, augmented_files = plain_data.train(0, args.epochs), augmented_data.train(0, args.epochs)
    # The baseline's images: this same pipeline's output, decoded and resized once, held in memory.
    preloaded = np.concatenate([images for images, _ in plain_data.train(0, 1).as_numpy_iterator()])
    in_memory = tf.data.Dataset.from_tensor_slices(preloaded).batch(args.batch_size).repeat(args.epochs)
    in_memory = in_memory.prefetch(tf.data.AUTOTUNE)
    images, steps = len(preloaded) * args.epochs, plain_data.steps_per_epoch * args.epochs

    def predict(dataset: tf.data.Dataset) -> None:
        model.predict(dataset, steps=steps, verbose=0)  # steps: the files' datasets do not know their length

    def iterate(dataset: tf.data.Dataset) -> None:
        for _ in dataset:
            pass

    plain_input, augmented_input = "JPEG files: decode, resize", "JPEG files: decode, resize, augment"
    cases = [  # (input, whether the model runs, one pass); the baseline first
        ("in-memory tensors", True, lambda: predict(in_memory)),
        (plain_input, True, lambda: predict(files)),
        (augmented_input, True, lambda: predict(augmented_files)),
        (plain_input, False, lambda: iterate(files)),
        (augmented_input, False, lambda: iterate(augmented_files)),
    ]
    for _, _, run in cases:  # untimed: traces predict for full and last batches, warms tf.data
        run()
    rates = [[] for _ in cases]
    for _ in range(args.repeats):
        for (_, _, run), runs in zip(cases, rates):
            runs.append(images_per_second(run, images))
    shutil.rmtree(work, ignore_errors=True)

    height, width = plain.image_size
    print(f"# input pipeline: {len(preloaded)} JPEG files (training split of {args.images}) x {args.epochs} "
          f"epochs, batch {args.batch_size}, frozen {plain.backbone.name} {height}x{width} by model.predict, "
          f"median of {args.repeats}")
    print(f"{machine(tensorflow=tf.__version__, keras=keras.__version__)} | load average {load:.1f} at start")
    print("| input | model | median images/s | all runs (images/s) | vs in-memory model (busy / headroom), "
          "median of per-repeat ratios |")
    print("|---|---|---|---|---|")
    for (name, with_model, _), runs in zip(cases, rates):
        ratio = statistics.median(run / baseline for run, baseline in zip(runs, rates[0]))
        print(f"| {name} | {'yes' if with_model else 'none'} | {statistics.median(runs):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in runs)} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
