"""Benchmark: steady-state epoch time of train.py against a hand-written `model.fit`, in one run.

train.py's run is `pipeline.run.train` on the composed `conf/train.yaml`: default callbacks
(conf/callbacks/default.yaml) and resume on, as a user gets them. The hand-written run takes the
same model and the same `tf.data` pipeline from the same task object, compiles them the same way
and calls a bare `model.fit(..., validation_data=...)` with only the timer. A third row keeps
train.py but drops the per-epoch saving (`callbacks=minimal resume=false`: TensorBoard and
throughput only), so the table separates what saving costs from what the rest of train.py costs.

An epoch's time is the wall time from its start to the next epoch's start, so it holds training,
validation and one full round of every callback's epoch-end work (checkpoints, resume state,
TensorBoard, CSV). The first epoch (tracing) and the last (no next start) are left out. Runs
alternate (train.py, minimal, hand-written, train.py, ...) so a busy machine slows all alike. Each
Keras backend (TensorFlow, JAX) is measured in its own process, its ratios against its own
hand-written run, and each time also against the first backend's.

    python bench/framework_overhead.py --tasks classification transfer --images 60 --epochs 4 --repeats 3
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
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import pipeline.schema  # noqa: E402,F401
from pipeline.demo import ensure_demo_folder  # noqa: E402
from pipeline.run import train  # noqa: E402
from common import add_backend_arguments, jax_version, machine, subset, times_per_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BASELINE = "hand-written model.fit"
RUNS = {  # name -> extra overrides of train.py's run
    "train.py (default callbacks, resume)": [],
    "train.py, callbacks=minimal resume=false": ["callbacks=minimal", "resume=false"],
}


class EpochTimer(keras.callbacks.Callback):
    """Writes the seconds between consecutive epoch starts to `filename` (a JSON list) at the end.

    Start to start rather than start to end: callbacks run in list order, so an epoch-end hook
    would miss the callbacks after it (train.py appends its resume state last). Hydra builds the
    one in train.py's run from the config, hence a file rather than an attribute to read back.

    Args:
        filename: where the list goes.
    """

    def __init__(self, filename: str):
        super().__init__()
        self.filename = filename
        self.starts = []

    def on_epoch_begin(self, epoch, logs=None):
        self.starts.append(time.perf_counter())

    def on_train_end(self, logs=None):
        seconds = [end - start for start, end in zip(self.starts, self.starts[1:])]
        Path(self.filename).write_text(json.dumps(seconds))


def compose_run(task: str, data: Path, work: Path, run: str, args: argparse.Namespace,
                extra: list[str]) -> DictConfig:
    """conf/train.yaml for one run in its own folder, with the timer added as the last callback."""
    output = work / run
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[
            f"paths.root={work}", f"paths.output_dir={output}", f"paths.resume_dir={output / 'resume'}",
            f"paths.cache_dir={work / 'cache'}",  # feature cache: cold in the first run, warm after
            f"backbone.imagenet_weights.cache_dir={ROOT / '.cache' / 'weights'}",  # converted once, shared
            f"task={task}", "dataset=folder", f"dataset.root={data}", f"epochs={args.epochs}",
            f"batch_size={args.batch_size}", "verbose=0", *extra,
            f"+callbacks.epoch_timer._target_={EpochTimer.__module__}.EpochTimer",
            f"+callbacks.epoch_timer.filename={output / 'epoch_seconds.json'}"])


def pipeline_run(cfg: DictConfig) -> list[float]:
    """train.py's whole run; returns its epoch times."""
    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "epoch_seconds.json").read_text())


def hand_written_run(cfg: DictConfig) -> list[float]:
    """The same model and data from the same task object, compiled the same way; a bare fit."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    task = instantiate(cfg.task)
    model = task.build_model()
    model.compile(optimizer=instantiate(cfg.optimizer, _convert_="all"), loss=task.loss,
                  metrics=task.metrics(), jit_compile=cfg.jit_compile)
    data = task.datasets(cfg.batch_size)
    filename = Path(cfg.paths.output_dir) / "epoch_seconds.json"
    filename.parent.mkdir(parents=True)
    model.fit(data.train(0, cfg.epochs), steps_per_epoch=data.steps_per_epoch, validation_data=data.validation,
              epochs=cfg.epochs, callbacks=[EpochTimer(str(filename))], verbose=0, shuffle=False)
    return json.loads(filename.read_text())


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """task -> run -> timed epoch seconds, under this process's Keras backend."""
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    data = subset(ensure_demo_folder(str(ROOT / "datasets" / "demo")), work / "data", args.images)
    times = {task: {name: [] for name in [*RUNS, BASELINE]} for task in args.tasks}
    for repeat in range(args.repeats):
        for task in args.tasks:
            for number, (name, extra) in enumerate(RUNS.items()):
                cfg = compose_run(task, data, work, f"{task}-{number}-{repeat}", args, extra)
                times[task][name] += pipeline_run(cfg)[1:]
            cfg = compose_run(task, data, work, f"{task}-keras-{repeat}", args, [])
            times[task][BASELINE] += hand_written_run(cfg)[1:]
    shutil.rmtree(work, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["classification", "transfer"],
                        choices=["classification", "transfer"])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=4, help="at least 3: the first and last are not timed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    add_backend_arguments(parser)
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error(f"--epochs must be at least 3 (the first and last epoch are not timed); got {args.epochs}.")
    if args.json:
        print(json.dumps(measure(args)))
        return

    argv = ["--tasks", *args.tasks, f"--images={args.images}", f"--epochs={args.epochs}",
            f"--batch-size={args.batch_size}", f"--repeats={args.repeats}"]
    times = times_per_backend(__file__, argv, args.backends)
    first = args.backends[0]
    print(f"# framework overhead: {args.images} demo images (about 80 % train), batch {args.batch_size}, "
          f"MobileNet v1 224x224, {args.epochs} epochs per run of which {args.epochs - 2} timed, "
          f"{args.repeats} repeats, median over all timed epochs; each backend in its own process")
    print(machine(tensorflow=tf.__version__, keras=keras.__version__, jax=jax_version()))
    print(f"| backend | task | run | median epoch (s) | min-max (s) | epochs timed | vs hand-written (same backend) "
          f"| time vs {first} |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, tasks in times.items():
        for task, runs in tasks.items():
            baseline = statistics.median(runs[BASELINE])
            for name, values in runs.items():
                median = statistics.median(values)
                print(f"| {backend} | {task} | {name} | {median:.3f} | {min(values):.3f}-{max(values):.3f} | "
                      f"{len(values)} | {median / baseline:.2f}x | "
                      f"{median / statistics.median(times[first][task][name]):.2f}x |")


if __name__ == "__main__":
    main()
