"""Benchmark: peak resident memory of feature caching for N and 10N images, against holding them all.

Streaming is `FeatureCache.fill` as the transfer task calls it: the extractor from
`Backbone.feature_extractor` (ImagePreprocessing + frozen MobileNet v1), the task's resize layer,
features written to disk batch by batch. The plain way, measured in the same run, decodes every
image into one array and runs `extractor.predict` over all of it, so images and features are all in
memory at once. Each case runs in its own process with an empty cache folder.

"Memory added" is the peak resident memory during the call over the resident memory just before
it. "Before" is taken after the model is built and one warm-up batch has gone through the same
call, so TensorFlow's start-up (runtime, kernels, thread pools) is not counted as caching; the peak
is reset there through /proc/self/clear_refs (Linux). Target: memory added at 10N under 1.5x that at
N. "Process peak" is the whole process's peak, start-up included. Random weights
(`backbone.weights=null`): the variables, and so the memory, are the same as with ImageNet's.

glibc's malloc raises its mmap threshold each time a large buffer is freed and then keeps later
buffers of that size in its heap, so a streaming loop's resident memory creeps up over the first
few hundred images before it levels off. `MALLOC_MMAP_THRESHOLD_=131072` fixes the threshold and
shows the memory the work itself needs; the header says which allocator setting was measured.

    python bench/cache_memory.py --images 40 400 --repeats 3
    MALLOC_MMAP_THRESHOLD_=131072 python bench/cache_memory.py --images 40 400 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, subset

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
WAYS = {"predict": "plain: decode all, predict all", "stream": "FeatureCache.fill (streaming)"}


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in KiB."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(f"{field}:")).split()[1])


def measure(way: str, data: Path, batch_size: int) -> dict:
    """Runs one case in this process and returns its figures."""
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np
    import tensorflow as tf
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import pipeline.schema  # noqa: F401
    from pipeline.cache import CacheFill, FeatureCache
    from pipeline.data import read_image, tf_paths

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["task=transfer", "dataset=folder", f"dataset.root={data}",
                                          "backbone.weights=null", f"paths.root={work}"])
    task = instantiate(cfg.task)
    extractor = task.backbone.feature_extractor(task.image_size)
    relative = [path for split in task.dataset.splits.values() for path in split.relative_paths]
    paths, orientations = task.dataset.absolute(relative), task.dataset.orientations(relative)

    def fill(directory: Path, count: int) -> CacheFill:
        cache = FeatureCache(directory, extractor, key={"backbone": task.backbone.name})
        return cache.fill(paths[:count], orientations[:count], batch_size, task.resizing)

    def predict_all(count: int) -> np.ndarray:
        """The plain way: every image decoded and resized into one array, then one predict call.

        The same decode and resize as `fill`, so the two differ only in what they hold.
        """
        def load(path, orientation):
            return task.resizing(tf.cast(read_image(path, orientation), tf.float32))

        images = tf.data.Dataset.from_tensor_slices((tf_paths(paths[:count]), orientations[:count]))
        images = images.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        return extractor.predict(np.concatenate(list(images.as_numpy_iterator())), batch_size=batch_size,
                                 verbose=0)

    if way == "stream":
        fill(work / "warm-up", batch_size)
        run = functools.partial(fill, work / "cache", len(paths))
    else:
        predict_all(batch_size)
        run = functools.partial(predict_all, len(paths))
    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak (VmHWM) to the memory resident now
    before = resident_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    added = resident_kib("VmHWM") - before
    peak = max(start_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    disk = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    shutil.rmtree(work, ignore_errors=True)
    return {"way": way, "images": len(paths), "peak_mib": peak / 1024, "added_mib": added / 1024,
            "disk_mib": disk / 2**20, "seconds": seconds, "keras": keras.__version__,
            "tensorflow": tf.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[40, 400], help="N and 10N (any sizes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=list(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.data, args.batch_size)))
        return

    sys.path.insert(0, str(ROOT))
    from pipeline.demo import ensure_demo_folder

    work = Path(tempfile.mkdtemp(prefix="bench-cache-data-"))
    demo = Path(ensure_demo_folder(str(ROOT / "datasets" / "demo")))
    data = {images: subset(demo, work / str(images), images) for images in args.images}
    runs = {(way, images): [] for images in args.images for way in WAYS}
    for _ in range(args.repeats):
        for (way, images), results in runs.items():
            result = subprocess.run([sys.executable, __file__, "--case", way, "--data", str(data[images]),
                                     "--batch-size", str(args.batch_size)],
                                    capture_output=True, text=True, check=True)
            results.append(json.loads(result.stdout.strip().splitlines()[-1]))
    shutil.rmtree(work, ignore_errors=True)

    def median(way: str, images: int, figure: str) -> float:
        return statistics.median(r[figure] for r in runs[way, images])

    versions = runs["stream", args.images[0]][0]
    print(f"# feature caching memory: {', '.join(map(str, args.images))} demo images, batch {args.batch_size}, "
          f"MobileNet v1 224x224 (random weights), one process per case, median of {args.repeats}")
    print(f"{machine(tensorflow=versions['tensorflow'], keras=versions['keras'])} | "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default)')}")
    print(f"| way | images | process peak (MiB) | memory added (MiB) | all runs added (MiB) "
          f"| added vs {args.images[0]} images | added vs plain | cache on disk (MiB) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for way, name in WAYS.items():
        for images in args.images:
            added = median(way, images, "added_mib")
            all_runs = ", ".join(f"{r['added_mib']:.0f}" for r in runs[way, images])
            print(f"| {name} | {images} | {median(way, images, 'peak_mib'):.0f} | {added:.0f} | {all_runs} | "
                  f"{added / median(way, args.images[0], 'added_mib'):.2f}x | "
                  f"{added / median('predict', images, 'added_mib'):.2f}x | "
                  f"{median(way, images, 'disk_mib'):.1f} | {median(way, images, 'seconds'):.1f} |")


if __name__ == "__main__":
    main()
