"""Fault injection: bad configs give one clear message, a non-zero exit and no finished-looking run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tests.conftest import CONF, TINY, compose_config, write_bad_layout


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
    from pipeline.checks import check_run_config
    from tests.conftest import compose_config

    cfg = compose_config(["optimizer.learning_rate=1"], tmp_path)
    check_run_config(cfg)
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    import keras

    keras.optimizers.Adam(learning_rate=cfg.optimizer.learning_rate)  # Keras refuses the int 1


@pytest.fixture(scope="module")
def wrong_weights(tmp_path_factory):
    """A garbage .h5 and the weights of a narrower MobileNet (alpha 0.5): wrong shapes everywhere."""
    import keras

    folder = tmp_path_factory.mktemp("weights")
    (folder / "garbage.h5").write_bytes(b"this is not an HDF5 file\n" * 20)
    keras.applications.MobileNet(include_top=False, weights=None, input_shape=(64, 64, 3), alpha=0.5).save_weights(
        folder / "half.weights.h5")
    keras.backend.clear_session()
    return folder


@pytest.mark.parametrize("name,message", [
    ("garbage.h5", "cannot be read as Keras weights"),
    ("half.weights.h5", "A total of 54 objects could not be loaded"),
])
def test_unusable_weight_files_are_one_short_line_naming_the_path(name, message, wrong_weights, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    path = wrong_weights / name
    backbone = instantiate(compose_config([*TINY, f"backbone.weights={path}"], tmp_path).backbone)
    with pytest.raises(ValueError) as raised:
        backbone.build([64, 64])
    text = str(raised.value)
    assert message in text and str(path) in text, text
    assert "\n" not in text and len(text) < 800 and "e-0" not in text, text  # no tensor dump


def test_an_error_inside_an_instantiated_constructor_keeps_its_lines_and_names_the_key(photo_folder, tmp_path):
    import shutil

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from pipeline.cli import describe_error
    from tests.conftest import compose_config

    shutil.copy(photo_folder / "cat" / "cat_001.JPG", photo_folder / "rocket" / "copy.jpg")
    cfg = compose_config([*TINY, f"dataset.root={photo_folder}", "dataset.on_duplicate=error"], tmp_path)
    with pytest.raises(InstantiationException) as raised:
        instantiate(cfg.dataset)
    message = describe_error(raised.value)
    assert message.startswith("ValueError: 1 file(s) have the same bytes") and message.endswith("(in dataset)")
    assert "\n  cat/cat_001.JPG = rocket/copy.jpg\n" in message and "\\n" not in message


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
    (["backbone.weights=/no/such/file.h5"], "backbone.weights='/no/such/file.h5' is neither 'imagenet', null, nor an "
                                            "existing file"),
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


@pytest.mark.parametrize("layout,overrides,message", [
    ("one_class", ["dataset=folder"],
     "Dataset root {root} has only 1 class folder (cat); a classifier needs at least two"),
    ("empty_class", ["dataset=folder"],
     "Class folder {root}/dog has no images with extensions .jpg, .jpeg, .png, .bmp, .gif (it holds 1 .txt"),
    ("no_classes", ["dataset=folder"], "Dataset root {root} has no class folders; a classifier needs at least two"),
    ("loose_images", ["dataset=folder"], "has no class folders and 2 image file(s) directly in it"),
    ("one_class", ["dataset=folder", "dataset.on_bad_image=sometimes"], "on_bad_image must be 'skip' or 'error'"),
    ("voc_without_jpegimages", ["task=fcn32", "dataset=voc"], "{root} is not a PASCAL VOC folder: it has no JPEGImages/"),
    ("voc_without_lists", ["task=fcn32", "dataset=voc"],
     "Image list {root}/ImageSets/Segmentation/train.txt for 'voc/train' does not exist"),
    ("voc_without_masks", ["task=fcn32", "dataset=voc"], "{root} has no SegmentationClass/, the folder of VOC's class masks"),
    ("coco_without_annotations", ["task=fcn32", "dataset=coco"],
     "COCO annotation file {root}/annotations/instances_train2017.json (train) does not exist"),
])
def test_data_sets_that_cannot_work_are_reported_before_tensorflow_is_imported(layout, overrides, message, tmp_path,
                                                                               without_tensorflow):
    """An empty class folder or a single class used to be found 9 s in, after TensorFlow loaded; now ~1 s."""
    root = write_bad_layout(layout, tmp_path / "data").resolve()
    result = subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", *overrides,
         f"dataset.root={root}"], cwd=CONF.parent, capture_output=True, text=True, timeout=600,
        env=without_tensorflow)
    assert result.returncode == 1
    assert message.format(root=root) in result.stderr, result.stderr[-2000:]
    assert "TensorFlow was imported" not in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "run" / "error.txt").is_file() and not (tmp_path / "run" / "metrics.json").exists()


def test_an_unknown_export_format_stops_the_run_before_training(tmp_path, without_tensorflow):
    """`export.formats=[tflite]` used to train fully, then fail in export."""
    result = subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", "export.formats=[tflite]"],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600, env=without_tensorflow)
    assert result.returncode == 1
    assert ("export.formats: Unknown export format(s) ['tflite']: choose from ['saved_model', 'litert', 'onnx']"
            in result.stderr and "TFLite files are written by litert" in result.stderr), result.stderr[-2000:]
    assert "TensorFlow was imported" not in result.stderr
    assert not (tmp_path / "run" / "history.csv").exists()

    from pipeline.checks import check_train_config

    cfg = compose_config(["export.formats=onnx"], tmp_path)  # one name, as export.py formats=onnx takes
    check_train_config(cfg)
    assert list(cfg.export.formats) == ["onnx"]


def test_a_task_and_a_dataset_that_do_not_fit_are_one_clear_message(photo_folder, tmp_path, without_tensorflow):
    result = subprocess.run(  # forgot task=fcn32: stopped from the config, before TensorFlow (it took 14 s)
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", "dataset=voc_demo"],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600, env=without_tensorflow)
    assert result.returncode == 1 and "TensorFlow was imported" not in result.stderr
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


def test_the_early_tables_know_every_task_and_dataset_of_conf_and_their_kinds():
    """pipeline.checks names tasks and datasets by `_target_` (it cannot import them before TensorFlow):
    a renamed class or a new option must be added there, with the kind its class really has."""
    import importlib

    from omegaconf import OmegaConf

    from pipeline.checks import DATASET_CHECKS, DATASET_KINDS, TASK_DATA
    from pipeline.data import ImageFolder
    from pipeline.segmentation import SegmentationData

    def targets(group):
        return {OmegaConf.load(path).get("_target_") for path in (CONF / group).glob("*.yaml")} - {None}

    assert targets("task") == set(TASK_DATA) and targets("dataset") <= set(DATASET_KINDS) == set(DATASET_CHECKS)
    for target, kind in DATASET_KINDS.items():
        module, name = target.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, ImageFolder if kind == "folder" else SegmentationData), target
    for target, (name, _) in TASK_DATA.items():
        module, cls_name = target.rsplit(".", 1)
        assert importlib.import_module(module).__dict__[cls_name] and (CONF / "task" / f"{name}.yaml").is_file()


def test_a_strategy_that_cannot_start_names_its_keys(tmp_path):
    from pipeline.run import start_strategy

    with pytest.raises(RuntimeError, match="Could not start the strategy tensorflow.distribute.TPUStrategy: "
                                           "Please provide a TPU Name.* strategy.tpu_cluster_resolver.tpu=''.*"
                                           "e.g. strategy.tpu_cluster_resolver.tpu=VALUE"):
        start_strategy(compose_config(["strategy=tpu"], tmp_path).strategy)
