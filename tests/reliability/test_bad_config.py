"""Fault injection: bad configs give one clear message, a non-zero exit and no finished-looking run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import CONF, TINY


def train_cli(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", *overrides],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("override,message", [
    ("backbone=resnet5O", "Could not find 'backbone/resnet5O'"),
    ("task=segment", "Could not find 'task/segment'"),
    ("epochs=ten", "Value 'ten' of type 'str' could not be converted to Integer"),
    ("image_size=[224,wide]", "could not be converted to Integer"),
    ("batch_size=1.5", "could not be converted to Integer"),
])
def test_config_errors_are_caught_when_composing(override, message, tmp_path):
    result = train_cli(tmp_path, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing ran, so no run folder"


@pytest.mark.parametrize("overrides,message", [
    (["dataset=folder", "dataset.root=/no/such/folder"], "Dataset root /no/such/folder does not exist"),
    (["image_size=[16,16]"], "cannot be built with image_size=[16, 16]"),
    (["dataset.on_bad_image=sometimes"], "on_bad_image must be 'skip' or 'error'"),
])
def test_runtime_config_errors_are_one_clear_message(overrides, message, photo_folder, tmp_path):
    result = train_cli(tmp_path, *TINY, f"dataset.root={photo_folder}", *overrides)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = tmp_path / "run"
    assert "Traceback" in (run_dir / "error.txt").read_text(), "the details are kept for a bug report"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.keras").exists()


@pytest.mark.parametrize("override,message", [
    ("batch_size=0", "batch_size=0 is out of range: it must be a number >= 1"),
    ("batch_size=-4", "batch_size=-4 is out of range: it must be a number >= 1"),
    ("epochs=0", "epochs=0 is out of range: it must be a number >= 1"),
    ("epochs=-3", "epochs=-3 is out of range"),
    ("optimizer.learning_rate=-0.1", "optimizer.learning_rate=-0.1 is out of range: it must be a number > 0"),
    ("task.dropout_rate=1.5", "task.dropout_rate=1.5 is out of range: it must be a number >= 0 and < 1"),
])
def test_out_of_range_values_stop_before_anything_runs(override, message, tmp_path):
    result = train_cli(tmp_path, override)
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "model.keras").exists()
    assert "tensorflow" not in result.stderr.lower(), "stopped before TensorFlow was loaded"


def test_an_integer_learning_rate_is_a_float(tmp_path):
    from pipeline.schema import check_run_config
    from tests.conftest import compose_config

    cfg = compose_config(["optimizer.learning_rate=1"], tmp_path)
    check_run_config(cfg)
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    import keras

    keras.optimizers.Adam(learning_rate=cfg.optimizer.learning_rate)  # Keras refuses the int 1
