"""Keras callbacks: values added to the epoch logs for TensorBoard and CSVLogger, and atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import h5py
import keras
import numpy as np

from pipeline.files import atomic_path, atomic_write_text


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
    and with it the learning-rate schedule's position), the random-generator states of layers
    such as Dropout, and the state of every stateful callback of the run (EarlyStopping's wait,
    best value and best weights, Checkpoint's best value, ReduceLROnPlateau's counters), and
    whether a callback stopped training; the number in the name is the epoch to continue from.
    Written to a temporary file and renamed, so a file that exists is complete. Epochs whose loss
    is not finite are not saved. `restore` reads the newest file into the model; the callbacks get
    their state back in `on_train_begin`, after they reset themselves, so this callback must come
    after them (it is appended last).

    Args:
        directory: where this phase's state lives (the same for the same run).
        save: False for non-chief workers of a multi-worker run, which only read.
        callbacks: the run's other callbacks, whose state is saved and restored with the model's.
    """

    def __init__(self, directory: str | Path, save: bool = True, callbacks: list | tuple = ()):
        super().__init__()
        self.directory = Path(directory)
        self.save = save
        self.callbacks = list(callbacks)
        self.stopped = False  # a callback (EarlyStopping) had stopped training at the restored epoch
        self._restored_callbacks: list[tuple[str, dict, list | None]] | None = None

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
            self.stopped = bool(file.attrs.get("stopped", False))
            self._restored_callbacks = []
            group = file.get("callbacks")
            for index in range(len(group) if group is not None else 0):
                saved = group[str(index)]
                weights = ([saved["best_weights"][str(i)][()] for i in range(len(saved["best_weights"]))]
                           if "best_weights" in saved else None)
                self._restored_callbacks.append((saved.attrs["class"], json.loads(saved.attrs["state"]),
                                                 weights))
        return int(states[-1].name.split("-")[1].split(".")[0])

    def on_train_begin(self, logs=None):
        # The callbacks before this one have just reset themselves (EarlyStopping does in its
        # on_train_begin): give them the state they had at the restored epoch.
        for callback, (name, state, weights) in zip(self.callbacks, self._restored_callbacks or []):
            if type(callback).__name__ != name:
                continue
            for attribute, value in state.items():
                setattr(callback, attribute, value)
            if weights is not None:
                callback.best_weights = weights
        self._restored_callbacks = None  # a second fit (the next phase) starts from its own state

    def on_epoch_end(self, epoch, logs=None):
        if not self.save or not math.isfinite((logs or {}).get("loss", math.nan)):
            return
        with atomic_path(self.directory / f"epoch-{epoch + 1:04d}.weights.h5") as path:
            self.model.save_weights(path)
            with h5py.File(path, "a") as file:
                group = file.create_group("seed_generators")
                for variable in _seed_states(self.model):
                    group[variable.path.replace("/", "|")] = keras.ops.convert_to_numpy(variable)
                file.attrs["stopped"] = bool(self.model.stop_training)
                group = file.create_group("callbacks")
                for index, callback in enumerate(self.callbacks):
                    saved = group.create_group(str(index))
                    saved.attrs["class"] = type(callback).__name__
                    saved.attrs["state"] = json.dumps(callback_state(callback))
                    weights = getattr(callback, "best_weights", None)
                    if weights is not None:
                        arrays = saved.create_group("best_weights")
                        for i, array in enumerate(weights):
                            arrays[str(i)] = array
        for old in self._states()[:-1]:
            old.unlink(missing_ok=True)

    def clear(self) -> None:
        if self.save:
            shutil.rmtree(self.directory, ignore_errors=True)


# Attributes through which Keras's and this module's callbacks carry state from epoch to epoch.
_CALLBACK_STATE = ("wait", "stopped_epoch", "best", "best_epoch", "cooldown_counter")


def callback_state(callback: keras.callbacks.Callback) -> dict:
    """The epoch-to-epoch state of a callback as JSON-able values (best weights are saved apart)."""
    state = {}
    for attribute in _CALLBACK_STATE:
        value = getattr(callback, attribute, None)
        if value is None and not hasattr(callback, attribute):
            continue
        if value is None or isinstance(value, (bool, int, float, np.integer, np.floating)):
            state[attribute] = value if value is None or isinstance(value, bool) else (
                int(value) if isinstance(value, (int, np.integer)) else float(value))
    return state


def drop_history_from(path: str | Path, first_epoch: int) -> None:
    """Removes the rows of epochs >= `first_epoch` from a CSVLogger file, before they are trained again.

    A run killed after CSVLogger wrote an epoch's row but before the resume state of that epoch was
    saved trains that epoch again on resume; without this, history.csv would hold it twice.

    Args:
        path: the CSVLogger's file (nothing happens if it does not exist).
        first_epoch: the first epoch (0-based, CSVLogger's `epoch` column) about to be trained.
    """
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]] + [line for line in lines[1:]
                         if line.split(",", 1)[0].strip().isdigit() and int(line.split(",", 1)[0]) < first_epoch]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _seed_states(model: keras.Model) -> list:
    """The state variables of the model's random generators (Dropout...), which save_weights skips."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]
