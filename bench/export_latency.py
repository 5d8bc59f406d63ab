"""Benchmark: images/s of each exported format vs `model.predict` on model.keras, at batch 1 and 32, on CPU.

The model is the transfer classifier as training saves it (MobileNet v1, genuine ImageNet weights,
224x224, the demo set's 6 classes), exported by `pipeline.export.run.export_run` with parity checked.
Every runtime gets the same uint8 256x256 photo crops (the model resizes inside); the figure is the
median of `--repeats` passes over `--images` images after one warm-up pass.

    python bench/export_latency.py --images 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
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
from pipeline.export import FILE_NAMES, FORMATS  # noqa: E402
from pipeline.export.run import export_run  # noqa: E402
from pipeline.export.runtimes import runner_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def exported_run(work: Path) -> Path:
    """A run folder with the transfer classifier's model.keras and all formats exported from it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root={ROOT}", f"paths.output_dir={work}",
                                          f"paths.resume_dir={work}/resume"])
    task = instantiate(cfg.task)
    run_dir = work / "run"
    run_dir.mkdir(parents=True)
    task.export_model(task.build_model()).save(run_dir / "model.keras")
    (run_dir / "class_names.json").write_text(json.dumps(task.dataset.class_names))
    test = task.dataset.splits["test"]
    export_run(run_dir, FORMATS, images=task.dataset.absolute(test.relative_paths), max_images=8)
    return run_dir


def photo_crops(count: int) -> np.ndarray:
    """`count` uint8 256x256 crops of the demo set's photos (any size works; a batch needs one)."""
    from skimage import data

    rng = np.random.default_rng(0)
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    crops = []
    for index in range(count):
        source = sources[index % len(sources)]
        top, left = rng.integers(0, source.shape[0] - 256), rng.integers(0, source.shape[1] - 256)
        crops.append(source[top : top + 256, left : left + 256])
    return np.stack(crops)


def images_per_second(run, images: np.ndarray, batch_size: int, repeats: int) -> float:
    """Median over `repeats` passes of `run` over `images` in batches, after one warm-up batch."""
    run(images[:batch_size])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            run(images[first : first + batch_size])
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        run_dir = exported_run(Path(work))
        parity = json.loads((run_dir / "export" / "parity.json").read_text())
        model = keras.saving.load_model(run_dir / "model.keras")
        images = photo_crops(args.images)
        runners = {"model.predict (model.keras)": lambda batch: model.predict(batch, batch_size=len(batch),
                                                                                verbose=0)}
        runners.update({f"{name} ({FILE_NAMES[name]})": runner_for(run_dir / "export" / FILE_NAMES[name])
                        for name in FORMATS})
        rows = {name: [images_per_second(run, images, batch, args.repeats) for batch in (1, 32)]
                for name, run in runners.items()}

    import onnxruntime

    print(f"# MobileNet v1 transfer classifier, 224x224 inside, uint8 256x256 inputs, {args.images} images, "
          f"median of {args.repeats}")
    print(machine(tensorflow=tf.__version__, keras=keras.__version__, onnxruntime=onnxruntime.__version__))
    print("| runtime | images/s, batch 1 | images/s, batch 32 | batch 1 vs model.predict | batch 32 vs model.predict "
          "| parity: max abs difference |")
    print("|---|---|---|---|---|---|")
    base = rows["model.predict (model.keras)"]
    for name, (one, many) in rows.items():
        key = name.split(" ")[0]
        difference = f"{parity[key]['max_abs_difference']:.1e}" if key in parity else "(reference)"
        print(f"| {name} | {one:.1f} | {many:.1f} | {one / base[0]:.2f}x | {many / base[1]:.2f}x | {difference} |")


if __name__ == "__main__":
    main()
