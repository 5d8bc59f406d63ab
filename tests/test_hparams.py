"""TensorBoard HParams, read back with TensorBoard's own reader: chosen values, session status, metrics once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from pipeline.hparams import chosen_hparams
from tests.conftest import CONF, TINY, compose_config


def read_run(folder: Path) -> EventAccumulator:
    return EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()


def session(folder: Path) -> tuple[dict, int | None]:
    """(hparams, end status) of the HParams session written in a TensorBoard run folder."""
    run = read_run(folder)
    content = run.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for name, value in start.hparams.items()}
    status = None
    if metadata.SESSION_END_INFO_TAG in content:
        status = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG]).status
    return hparams, status


def scalar_tags(folder: Path) -> set[str]:
    run = read_run(folder)
    return {tag for tag in run.Tags()["tensors"] if run.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run from the command line with two overrides a sweep would set."""
    from tests.conftest import write_photo_folder

    tmp = tmp_path_factory.mktemp("hparams")
    photos = write_photo_folder(tmp / "photos", images_per_class=8)
    shutil.copy(photos / "cat" / "cat_001.JPG", photos / "rocket" / "not_a_rocket.jpg")  # a duplicate
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, f"dataset.root={photos}", "optimizer.learning_rate=0.01",
         "task.dropout_rate=0.5", f"paths.root={tmp}", f"hydra.run.dir={tmp / 'run'}"],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run" / "tensorboard"


def test_hparams_hold_the_chosen_values_and_the_session_ends_with_success(finished):
    hparams, status = session(finished)
    assert status == api_pb2.STATUS_SUCCESS
    assert hparams["optimizer.learning_rate"] == 0.01 and hparams["task.dropout_rate"] == 0.5
    assert hparams["backbone"] == "mobilenet" and hparams["task"] == "transfer" and hparams["optimizer"] == "adam"
    assert hparams["batch_size"] == 8 and hparams["epochs"] == 1 and hparams["image_size"] == "[64, 64]"
    assert hparams["precision"] == "float32" and hparams["dataset"] == "folder"
    assert hparams["dataset.validation_percent"] == 25  # an override is a choice too
    assert not [name for name in hparams if name.startswith(("paths.", "callbacks.", "hydra.")) or "_target_" in name
                or name.startswith("task.backbone")], sorted(hparams)
    assert len(hparams) < 25, sorted(hparams)


def test_each_final_metric_is_written_once_in_the_run_of_its_split(finished):
    test, validation, root = (scalar_tags(finished / name) for name in ("test", "validation", "."))
    assert {"test/accuracy", "test/loss", "test/macro_f1"} <= test
    assert all(tag.startswith("test/") for tag in test), test
    assert {"validation/accuracy", "validation/loss"} <= validation
    assert not [tag for tag in validation if tag.startswith("test/")], validation
    assert root == {"skipped_images", "duplicate_images"}
    train = scalar_tags(finished / "train")
    assert not [tag for tag in train if "/" in tag], train  # only Keras's epoch_* curves


def test_duplicates_across_classes_are_counted_in_metrics_json(finished):
    assert json.loads((finished.parent / "metrics.json").read_text())["duplicate_images"] == 1


def test_a_failed_run_ends_its_session_with_failure(photo_folder, tmp_path):
    cat = photo_folder / "cat"  # a truncated JPEG, found when caching, stops the run with on_bad_image=error
    (cat / "truncated.jpg").write_bytes((cat / "cat_002.jpg").read_bytes()[:400])
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, f"dataset.root={photo_folder}", "dataset.on_bad_image=error",
         f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=CONF.parent, capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    hparams, status = session(tmp_path / "run" / "tensorboard")
    assert status == api_pb2.STATUS_FAILURE and hparams["backbone"] == "mobilenet"


def test_chosen_hparams_of_a_composed_config_name_the_options(tmp_path):
    cfg = compose_config(["task=classification", "backbone=vgg16", "precision=mixed_float16",
                          "task.augmentation=null"], tmp_path)
    hparams = chosen_hparams(cfg, overrides=["task.augmentation=null", "task.trainable_layers=3",
                                             "paths.cache_dir=/x", "hydra.verbose=true", "+extra.key=1"])
    assert hparams["backbone"] == "vgg16" and hparams["task"] == "ClassificationTask"
    assert hparams["precision"] == "mixed_float16" and hparams["backbone.weights"] == "imagenet"
    assert hparams["task.trainable_layers"] == 0  # the config's value: the override list is only names
    assert "task.augmentation" not in hparams  # null: nothing to compare
    assert "paths.cache_dir" not in hparams and "hydra.verbose" not in hparams and "extra.key" not in hparams
