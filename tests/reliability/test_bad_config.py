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
