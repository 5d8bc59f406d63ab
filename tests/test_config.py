"""Every option of every config group composes, and its `_target_` instantiates."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from hydra.utils import instantiate

from tests.conftest import CONF, TINY, compose_config

GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
          for group in ("backbone", "task", "dataset", "strategy", "optimizer", "callbacks",
                        "experiment", "sweep", "debug")}


def test_every_group_has_options():
    for group, options in GROUPS.items():
        assert options, f"conf/{group} is empty"


@pytest.mark.parametrize("backbone", GROUPS["backbone"])
def test_backbone_builds_and_cuts_at_stride_32(backbone, tmp_path):
    cfg = compose_config([f"backbone={backbone}"], tmp_path)
    if cfg.backbone.imagenet_weights is None:  # keras.applications would download them: needs a network
        cfg = compose_config([f"backbone={backbone}", "backbone.weights=null"], tmp_path)
    backbone = instantiate(cfg.backbone)
    small, large = backbone.build([96, 128]), backbone.build([160, 192])
    # Stride 32: 64 more pixels give exactly 2 more cells (Inception's valid padding shifts the origin).
    assert np.subtract(large.output_shape[1:3], small.output_shape[1:3]).tolist() == [2, 2]
    assert not small.trainable_weights, "backbones are frozen by default"


# Created at program start-up (they configure the runtime), so each in a fresh process; tpu needs a TPU.
# data_parallel is keras.distribution: under KERAS_BACKEND=jax, with two host devices.
STARTUP_STRATEGIES = {"mirrored_cpu": 2, "multi_worker_mirrored": 1, "data_parallel": 2}
JAX_ENV = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.mark.parametrize("option", [o for o in GROUPS["strategy"] if o not in STARTUP_STRATEGIES and o != "tpu"])
def test_strategy_instantiates(option, tmp_path):
    strategy = instantiate(compose_config([f"strategy={option}"], tmp_path).strategy)
    assert isinstance(strategy, tf.distribute.Strategy)
    with strategy.scope():
        keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


@pytest.mark.parametrize("option,replicas", STARTUP_STRATEGIES.items())
def test_startup_strategy_instantiates_in_a_fresh_process(option, replicas, tmp_path):
    replicas_in = "num_model_replicas" if option == "data_parallel" else "num_replicas_in_sync"
    script = (f"from tests.conftest import compose_config; from hydra.utils import instantiate; "
              f"from pathlib import Path; print(instantiate(compose_config(['strategy={option}'], "
              f"Path('{tmp_path}')).strategy).{replicas_in})")
    env = {**os.environ, **JAX_ENV} if option == "data_parallel" else None
    result = subprocess.run([sys.executable, "-c", script], cwd=CONF.parent, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(replicas)


@pytest.mark.parametrize("option", GROUPS["optimizer"])
def test_optimizer_instantiates(option, tmp_path):
    optimizer = instantiate(compose_config([f"optimizer={option}"], tmp_path).optimizer)
    assert isinstance(optimizer, keras.optimizers.Optimizer)


@pytest.mark.parametrize("option", GROUPS["callbacks"])
def test_callbacks_instantiate(option, tmp_path):
    callbacks = instantiate(compose_config([f"callbacks={option}"], tmp_path).callbacks)
    assert all(isinstance(c, keras.callbacks.Callback) for c in callbacks.values() if c is not None)


@pytest.mark.parametrize("option", GROUPS["task"])
def test_task_instantiates_with_its_backbone_and_data(option, photo_folder, tmp_path):
    tiny = without_folder_data(TINY) if option == "fcn32" else TINY
    cfg = compose_config([*tiny, f"task={option}", *data_for(option, photo_folder, tmp_path)], tmp_path)
    task = instantiate(cfg.task)
    assert task.num_classes == (21 if option == "fcn32" else 3)
    assert task.build_model().count_params() > 0


def without_folder_data(overrides: list[str]) -> list[str]:
    """TINY's overrides less those of the folder-per-class dataset (a VOC dataset has no percentages)."""
    return [override for override in overrides if not override.startswith("dataset")]


def data_for(task: str, photo_folder, tmp_path) -> list[str]:
    """Overrides after TINY for data the task takes: the photo folder, or a tiny VOC for segmentation."""
    if task != "fcn32":
        return [f"dataset.root={photo_folder}"]
    from tests.test_segmentation_data import write_voc_folder

    return ["dataset=voc", f"dataset.root={write_voc_folder(tmp_path / 'voc')}"]


@pytest.mark.parametrize("option", GROUPS["dataset"])
def test_dataset_instantiates(option, photo_folder, tmp_path):
    from tests.test_segmentation_data import SEGMENTATION_DATASETS  # tiny VOC / SBD / COCO copies

    overrides = ([f"dataset.root={photo_folder}"] if option == "folder"
                 else SEGMENTATION_DATASETS[option](tmp_path) if option in SEGMENTATION_DATASETS else [])
    cfg = compose_config([f"dataset={option}", *overrides], tmp_path)
    folder = instantiate(cfg.dataset)
    assert folder.num_classes >= 2
    assert all(len(split) for split in folder.splits.values())


@pytest.mark.parametrize("group", ["experiment", "sweep", "debug"])
def test_overlays_compose_and_their_task_instantiates(group, photo_folder, tmp_path):
    for option in GROUPS[group]:
        tiny = [override for override in TINY if not override.startswith(f"{group}=")]
        cfg = compose_config([*tiny, f"dataset.root={photo_folder}", f"{group}={option}"], tmp_path)
        if cfg.task._target_.endswith("FCN32Task"):  # a segmentation recipe: segmentation data
            cfg = compose_config([*without_folder_data(tiny), f"{group}={option}",
                                  *data_for("fcn32", photo_folder, tmp_path)], tmp_path)
        instantiate(cfg.task)
        instantiate(cfg.optimizer)


def test_experiment_files_start_with_their_command():
    for group in ("experiment", "sweep", "debug"):
        for path in (CONF / group).glob("*.yaml"):
            lines = path.read_text().splitlines()
            assert lines[0] == "# @package _global_", path
            assert lines[1].startswith(f"# python train.py") and f"{group}={path.stem}" in lines[1], path


def test_unknown_backbone_is_one_clear_error_listing_the_choices():
    result = subprocess.run([sys.executable, "train.py", "backbone=resnet5O"], cwd=CONF.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Could not find 'backbone/resnet5O'" in result.stderr
    assert "mobilenet_v1" in result.stderr and "Traceback" not in result.stderr


def test_weights_from_a_file_and_clear_errors_for_wrong_or_missing_files(tmp_path):
    slim = instantiate(compose_config(["backbone=mobilenet_v1"], tmp_path).backbone)
    path = slim.imagenet_weights(include_top=False)
    from_file = instantiate(compose_config(["backbone=mobilenet", f"backbone.weights={path}"], tmp_path).backbone)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
    np.testing.assert_allclose(from_file.build()(images), slim.build()(images), atol=1e-5)

    vgg = instantiate(compose_config(["backbone=vgg16", f"backbone.weights={path}"], tmp_path).backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="backbone.weights=.* does not fit backbone 'vgg16'"):
            vgg.build()
    assert not caught, "one clear error, not a warning per layer that did not fit"
    with pytest.raises(Exception, match="neither 'imagenet', null, nor an existing file"):
        instantiate(compose_config(["backbone=vgg16", f"backbone.weights={tmp_path}/nope.h5"], tmp_path).backbone)


@pytest.mark.parametrize("script", ["train.py", "predict.py", "annotate.py"])
def test_cfg_job_resolve_prints_the_resolved_config(script, tmp_path):
    result = subprocess.run([sys.executable, script, "--cfg", "job", "--resolve", f"paths.root={tmp_path}"],
                            cwd=CONF.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["paths"]["cache_dir"] == f"{tmp_path}/.cache"  # interpolations resolved
    assert printed["paths"]["output_dir"] is None  # --cfg prints without running: no run folder
