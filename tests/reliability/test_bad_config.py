"""Fault injection: bad configs give one clear message, a non-zero exit and no finished-looking run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tests.conftest import CONF, TINY, compose_config


def train_cli(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", *overrides],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("override,message", [
    ("backbone=resnet5O", "Could not find 'backbone/resnet5O'"),
    ("task=segment", "Could not find 'task/segment'"),
    ("epochs=ten", "Value 'ten' of type 'str' could not be converted to Integer"),
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


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory):
    """A PYTHONPATH on which `import tensorflow` fails loudly: checks that must come first do."""
    folder = tmp_path_factory.mktemp("no_tensorflow")
    (folder / "tensorflow").mkdir()
    (folder / "tensorflow" / "__init__.py").write_text(
        'raise ImportError("TensorFlow was imported before the config was checked")\n')
    return {**os.environ, "PYTHONPATH": str(folder)}


@pytest.mark.parametrize("overrides,message", [
    (["dataset=folder"], "Missing mandatory value: dataset.root (the folder of your data"),
    (["dataset=folder", "dataset.root=/no/such/folder"], "Dataset root /no/such/folder does not exist"),
    (["image_size=[224,wide]"], "image_size must be one positive int for a square (image_size=160) or [height, width]"),
    (["image_size=[224,224,3]"], "got [224, 224, 3]"),
])
def test_config_and_data_root_are_checked_before_tensorflow_is_imported(overrides, message, tmp_path,
                                                                         without_tensorflow):
    result = subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", *overrides],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600, env=without_tensorflow)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr[-2000:]
    assert "TensorFlow was imported" not in result.stderr and "Traceback" not in result.stderr
    assert "task.dataset.root" not in result.stderr, "the key the user sets, not the interpolated one"


def test_a_task_and_a_dataset_that_do_not_fit_are_one_clear_message(photo_folder, tmp_path):
    result = train_cli(tmp_path, "dataset=voc_demo", "debug=tiny")  # forgot task=fcn32
    assert result.returncode == 1
    assert ("ValueError: task=transfer needs a folder-per-class dataset (dataset=demo, or dataset=folder "
            "dataset.root=...); got VOCSegmentation") in result.stderr, result.stderr[-2000:]
    assert "task=fcn32 dataset=voc_demo" in result.stderr
    assert "AttributeError" not in result.stderr and "InstantiationException" not in result.stderr

    with pytest.raises(InstantiationException, match="task=classification needs a folder-per-class dataset"):
        instantiate(compose_config(["task=classification", "dataset=voc_demo"], tmp_path).task)
    with pytest.raises(InstantiationException, match="task=fcn32 needs a segmentation dataset .* use "
                                                     "task=transfer or task=classification"):
        instantiate(compose_config(["task=fcn32", "dataset=folder", f"dataset.root={photo_folder}"],
                                   tmp_path).task)


def test_a_strategy_that_cannot_start_names_its_keys(tmp_path):
    from pipeline.run import start_strategy

    with pytest.raises(RuntimeError, match="Could not start the strategy tensorflow.distribute.TPUStrategy: "
                                           "Please provide a TPU Name.* strategy.tpu_cluster_resolver.tpu=''.*"
                                           "e.g. strategy.tpu_cluster_resolver.tpu=VALUE"):
        start_strategy(compose_config(["strategy=tpu"], tmp_path).strategy)
