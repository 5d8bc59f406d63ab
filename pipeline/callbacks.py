"""Keras callbacks: values added to the epoch logs for TensorBoard and CSVLogger, and atomic checkpoints."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import h5py
import keras

from pipeline.files import atomic_path


class Throughput(keras.callbacks.Callback):
    """Adds `images_per_second`, the training throughput of the epoch, to the epoch logs.

    Counts the training steps actually run (the batch index Keras reports, so `steps_per_epoch`,
    `steps_per_execution` and an early end of the data are all accounted for) times `batch_size`,
    over the time from the start of the epoch to the end of its last training batch: validation,
    which runs before `on_epoch_end`, is left out. The last batch of an epoch may be smaller than
    `batch_size`, so the count can be slightly high. The first epoch includes graph tracing.

    Place it before `keras.callbacks.TensorBoard` and `CSVLogger`: callbacks see the same logs
    dict in list order.

    Args:
        batch_size: global batch size (summed over replicas under a distribution strategy).
    """

    # The batch hook only records an index, so it may run on Keras's async callback thread.
    async_safe = True

    def __init__(self, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Throughput needs a positive batch_size; got {batch_size}.")
        self.batch_size = batch_size
        self._epoch_start = None
        self._training_end = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._training_end = None
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last step run so far in this epoch (0-based); max() keeps
        # the count right even if asynchronous dispatch reorders calls.
        self._steps = max(self._steps, batch + 1)

    def on_test_begin(self, logs=None):
        # During fit, validation starts right after the last training batch: stop the clock there.
        if self._epoch_start is not None and self._training_end is None:
            self._training_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self._epoch_start is None or logs is None:
            return
        end = self._training_end if self._training_end is not None else time.perf_counter()
        seconds = end - self._epoch_start
        if self._steps > 0 and seconds > 0:
            logs["images_per_second"] = self._steps * self.batch_size / seconds
        self._epoch_start = None


class LearningRate(keras.callbacks.Callback):
    """Adds the optimizer's current `learning_rate` to the epoch logs.

    Keras 3's TensorBoard callback already writes `epoch_learning_rate` by itself, but CSVLogger and
    `History` only see what is in the logs; with this callback before them, they get it too. A
    schedule is evaluated at `optimizer.iterations`, i.e. the rate the next step will use.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.model.optimizer is None:
            return
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        # Keras 3 optimizers evaluate a schedule at `iterations` in this property; an optimizer that
        # returns the schedule itself gets the same treatment here.
        learning_rate = optimizer.learning_rate
        if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = learning_rate(optimizer.iterations)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(learning_rate))


class Checkpoint(keras.callbacks.Callback):
    """Saves the model (weights and optimizer state) after every epoch whose loss is finite.

    Writes `last.keras` every such epoch and `best.keras` when `monitor` improves, each to a
    temporary file renamed into place: a run killed while saving keeps the previous complete file.
    An epoch whose loss is NaN or infinite is not saved, so `last.keras` stays the last good model.

    Args:
        directory: the folder for the two files.
        monitor: the logged value that decides `best.keras`.
        mode: "min" or "max": whether lower or higher `monitor` is better.
    """

    def __init__(self, directory: str, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"Checkpoint mode must be 'min' or 'max'; got {mode!r}.")
        self.directory = Path(directory)
        self.monitor = monitor
        self.sign = 1 if mode == "min" else -1
        self.best = math.inf

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not math.isfinite(logs.get("loss", math.nan)):
            return
        last = self.directory / "last.keras"
        with atomic_path(last) as path:
            self.model.save(path)
        value = logs.get(self.monitor)
        if value is not None and math.isfinite(value) and self.sign * value < self.best:
            self.best = self.sign * value
            with atomic_path(self.directory / "best.keras") as path:
                # The same bytes as last.keras: a second link costs nothing, a second save as much
                # as the first. last.keras is always replaced by rename, so the link keeps this epoch.
                path.unlink()
                try:
                    os.link(last, path)
                except OSError:  # a file system without hard links
                    shutil.copyfile(last, path)


class ResumeState(keras.callbacks.Callback):
    """Everything needed to continue a run exactly, saved after each epoch in one atomic file.

    `epoch-0007.weights.h5` holds the model's weights, the optimizer's state (so its step count,
    and with it the learning-rate schedule's position) and the random-generator states of layers
    such as Dropout; the number in the name is the epoch to continue from. Written to a temporary
    file and renamed, so a file that exists is complete. Epochs whose loss is not finite are not
    saved. `restore` reads the newest file; `clear` removes the folder once the run has finished.

    Args:
        directory: where this run's state lives (the same for the same command).
        save: False for non-chief workers of a multi-worker run, which only read.
    """

    def __init__(self, directory: str | Path, save: bool = True):
        super().__init__()
        self.directory = Path(directory)
        self.save = save

    def _states(self) -> list[Path]:
        return sorted(self.directory.glob("epoch-*.weights.h5"))

    def restore(self, model: keras.Model) -> int:
        """Loads the newest saved state into `model`; returns the epoch to start from (0: none)."""
        states = self._states()
        if not states:
            return 0
        model.optimizer.build(model.trainable_variables)
        model.load_weights(states[-1])
        with h5py.File(states[-1], "r") as file:
            for variable in _seed_states(model):
                variable.assign(file["seed_generators"][variable.path.replace("/", "|")][()])
        return int(states[-1].name.split("-")[1].split(".")[0])

    def on_epoch_end(self, epoch, logs=None):
        if not self.save or not math.isfinite((logs or {}).get("loss", math.nan)):
            return
        with atomic_path(self.directory / f"epoch-{epoch + 1:04d}.weights.h5") as path:
            self.model.save_weights(path)
            with h5py.File(path, "a") as file:
                group = file.create_group("seed_generators")
                for variable in _seed_states(self.model):
                    group[variable.path.replace("/", "|")] = keras.ops.convert_to_numpy(variable)
        for old in self._states()[:-1]:
            old.unlink(missing_ok=True)

    def clear(self) -> None:
        if self.save:
            shutil.rmtree(self.directory, ignore_errors=True)


def _seed_states(model: keras.Model) -> list:
    """The state variables of the model's random generators (Dropout...), which save_weights skips."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]
