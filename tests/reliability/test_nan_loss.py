"""Fault injection: a learning rate that explodes mid-run makes the loss NaN."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline.run import train
from tests.conftest import CONF, TINY, compose_config

# Three steps of 8 images make the first epoch (18 training images); from step 3 on the rate is 3e38, near float32's largest number, and the update overflows.
EXPLODING = ("optimizer.learning_rate={_target_: keras.optimizers.schedules.PiecewiseConstantDecay,"
             " boundaries: [3], values: [0.001, 3.0e38]}")


@pytest.mark.parametrize("backend", ["tensorflow", pytest.param("jax", marks=pytest.mark.slow)])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(backend, photo_folder, tmp_path):
    overrides = [*TINY, f"dataset.root={photo_folder}", "optimizer=sgd", EXPLODING, "epochs=3"]
    run_dir = tmp_path / "run"
    message = "FloatingPointError: The training loss became nan in epoch 2. The last good model is "
    if backend == "tensorflow":
        with pytest.raises(FloatingPointError, match="The last good model is .*last.keras"):
            train(compose_config(overrides, tmp_path))
    else:  # the backend is chosen when Keras is imported: a train.py process of its own
        result = subprocess.run([sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={run_dir}",
                                 *overrides], cwd=CONF.parent, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "KERAS_BACKEND": backend})
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Keras backend: jax" in result.stderr
        assert f"{message}{run_dir / 'checkpoints' / 'last.keras'}" in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    model = keras.saving.load_model(run_dir / "checkpoints" / "last.keras", safe_mode=True)
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
    with open(run_dir / "history.csv") as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    assert not math.isfinite(losses[-1]), "training stopped at the first non-finite loss"
    assert losses[:-1] and all(math.isfinite(loss) for loss in losses[:-1])
    assert not (run_dir / "metrics.json").exists(), "a failed run does not look finished"
