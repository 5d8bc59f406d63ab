"""Checks of a composed config that need no TensorFlow: run first, so a typo is reported in a second.

Importing TensorFlow takes several seconds; a missing `dataset.root`, a malformed `image_size`, a data
folder with one class or an export format that does not exist should not wait for it (nor, for the last,
for a whole training run). Everything here reads only the config and the file system: folders are
listed, no image or weights file is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.export import check_formats  # pipeline/export/__init__.py imports nothing heavy
from pipeline.files import as_list
from pipeline.folders import check_coco_layout, check_image_folder, check_voc_layout

# Where a user sets a value that tasks read through interpolation: `task.dataset` is `${dataset}`.
_USER_KEYS = {"task.dataset.": "dataset.", "task.backbone.": "backbone."}


def image_size_pair(value) -> list[int]:
    """`[height, width]` from `image_size`: one int means a square, `160` -> `[160, 160]`.

    Args:
        value: an int, or a list / tuple of two ints.

    Raises:
        ValueError: anything else, with the two accepted forms.
    """
    if isinstance(value, (ListConfig, list, tuple)):
        sides = list(value)
    else:
        sides = [value, value]
    if len(sides) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0
                                  for side in sides):
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        raise ValueError(f"image_size must be one positive int for a square (image_size=160) or "
                         f"[height, width] (image_size=[160,224]); got {shown!r}.")
    return [int(side) for side in sides]


def user_key(key: str) -> str:
    """The key a user writes on the command line for a config key (`task.dataset.root` -> `dataset.root`)."""
    for inner, outer in _USER_KEYS.items():
        if key.startswith(inner):
            return outer + key[len(inner):]
    return key


def check_train_config(cfg: DictConfig) -> None:
    """Stops a run whose config cannot work, before anything slow is imported or built.

    Checks that every mandatory value (`???`) is set, normalises `image_size` (one int -> a square)
    and `export.formats` (one name -> a list) in place, the export formats, the ranges of
    `check_run_config`, that a `backbone.weights` path exists, that the task reads the kind of data
    the dataset gives, and that a dataset root given as a path exists and holds what its dataset
    needs (`check_dataset_on_disk`).

    Args:
        cfg: the composed `conf/train.yaml`.

    Raises:
        ValueError: a missing value, a malformed `image_size`, an unknown export format, a value out of
            its range, a task given the other kind of dataset, or a data set that cannot be used (fewer
            than two classes, a class without images).
        FileNotFoundError: a weights file or a dataset root that does not exist, or a VOC / COCO folder
            or file missing.
    """
    missing = sorted(user_key(key) for key in OmegaConf.missing_keys(cfg))
    if missing:
        hints = {"dataset.root": " (the folder of your data, e.g. dataset.root=/data/birds)"}
        listing = ", ".join(f"{key}{hints.get(key, '')}" for key in missing)
        raise ValueError(f"Missing mandatory value: {listing}. Set it on the command line: "
                         f"python train.py ... {missing[0]}=VALUE.")
    cfg.image_size = image_size_pair(cfg.image_size)
    if "export" in cfg:
        cfg.export.formats = export_formats(cfg.export.formats)
    check_run_config(cfg)
    backbone = cfg.get("backbone")
    if isinstance(backbone, DictConfig) and backbone.get("_target_") == "pipeline.backbones.Backbone":
        check_weights_file(backbone.name, backbone.get("weights", "imagenet"),
                           backbone.get("checkpoint_importer") is not None)
    if isinstance(cfg.get("dataset"), DictConfig):
        if isinstance(cfg.get("task"), DictConfig):
            check_task_fits_dataset(cfg.task.get("_target_"), cfg.dataset.get("_target_"))
        check_dataset_on_disk(cfg.dataset)


def check_weights_file(name: str, weights: str | None, has_importer: bool) -> None:
    """`backbone.weights` is "imagenet", null, or a file that exists; run by `pipeline.backbones.Backbone` too.

    Args:
        name: the backbone's name, for the message.
        weights: the `weights` value.
        has_importer: the backbone reads checkpoints too (a TF checkpoint is named by its prefix:
            `vgg_16.ckpt` for vgg_16.ckpt.index + .data-* files).

    Raises:
        FileNotFoundError: a path that is not a file (nor a checkpoint prefix).
    """
    if weights in (None, "imagenet"):
        return
    if not (Path(weights).is_file() or (has_importer and Path(f"{weights}.index").is_file())):
        raise FileNotFoundError(
            f"backbone.weights={weights!r} is neither 'imagenet', null, nor an existing file. "
            f"Give the path of a .h5 or .weights.h5 file for {name} without its top"
            + (", or of a checkpoint its importer reads." if has_importer else ".")
        )


def export_formats(value) -> list[str]:
    """`export.formats` as a list of known names (one name alone is a list of one; none: no export).

    The names are checked by export's own `check_formats`, before training, so a typo never costs a run.

    Args:
        value: a name, a list of names, or None / an empty list for no export.

    Raises:
        ValueError: an unknown name, with the valid ones.
    """
    formats = as_list(value)
    try:
        return check_formats(formats) if formats else []
    except ValueError as error:
        raise ValueError(f"export.formats: {error}") from None


# The data each task reads (its option name for messages, and the kind), and each dataset class's kind, by
# `_target_`: a task given the other kind stops here, before TensorFlow loads. The tasks check the same with
# isinstance when they are built (so a class of your own is checked then), raising `dataset_mismatch` too.
TASK_DATA = {
    "pipeline.tasks.transfer.TransferTask": ("transfer", "folder"),
    "pipeline.tasks.classification.ClassificationTask": ("classification", "folder"),
    "pipeline.tasks.fcn32.FCN32Task": ("fcn32", "segmentation"),
}
DATASET_KINDS = {
    "pipeline.data.ImageFolder": "folder",
    "pipeline.segmentation.VOCSegmentation": "segmentation",
    "pipeline.segmentation.COCOSegmentation": "segmentation",
}


def dataset_mismatch(task_name: str, needs: str, dataset_class: str) -> ValueError:
    """The error for a task given a dataset of the other kind, saying which option to add or change.

    Args:
        task_name: the task's option (`transfer`, `classification`, `fcn32`).
        needs: "folder" (folder-per-class) or "segmentation", what the task reads.
        dataset_class: the dataset's class name.
    """
    if needs == "folder":
        return ValueError(
            f"task={task_name} needs a folder-per-class dataset (dataset=demo, or dataset=folder "
            f"dataset.root=...); got {dataset_class}, a segmentation dataset. For segmentation "
            f"add task=fcn32: python train.py task=fcn32 dataset=voc_demo."
        )
    return ValueError(f"task={task_name} needs a segmentation dataset (dataset=voc, voc_sbd, voc_demo or coco); "
                      f"got {dataset_class}. For a folder-per-class dataset use task=transfer or task=classification.")


def check_task_fits_dataset(task_target: str | None, dataset_target: str | None) -> None:
    """Raises `dataset_mismatch` when the configured task reads another kind of data than the dataset gives.

    Args:
        task_target, dataset_target: the `_target_`s of the task and dataset groups (others are not checked here).
    """
    task_name, needs = TASK_DATA.get(task_target, (None, None))
    kind = DATASET_KINDS.get(dataset_target)
    if needs is not None and kind is not None and kind != needs:
        raise dataset_mismatch(task_name, needs, dataset_target.rsplit(".", 1)[1])


# The on-disk checks each dataset class can have before TensorFlow is imported, by its `_target_`. Each
# class calls the same function again when it is built (pipeline/folders.py holds the rules once), so the two
# never disagree; a dataset class of your own is checked when it is built.
DATASET_CHECKS = {
    "pipeline.data.ImageFolder": check_image_folder,
    "pipeline.segmentation.VOCSegmentation": check_voc_layout,
    "pipeline.segmentation.COCOSegmentation": check_coco_layout,
}


def check_dataset_on_disk(dataset: DictConfig) -> None:
    """The dataset's root exists and holds what its class needs, listing folders only (no image is opened).

    A folder-per-class root needs two class folders with an image each; VOC its JPEGImages/ and id lists;
    COCO its annotation files and image folders. A root written on first use (`dataset=demo`,
    `voc_demo`: a `_target_`, not a path) is not checked here.

    Args:
        dataset: the composed `dataset` group.

    Raises:
        FileNotFoundError, ValueError, ImportError: what the dataset's constructor would raise, with the same message.
    """
    root = dataset.get("root")
    if not isinstance(root, str):
        return
    if not Path(root).expanduser().is_dir():
        raise FileNotFoundError(
            f"Dataset root {Path(root).expanduser().resolve()} does not exist or is not a folder. Set "
            "dataset.root to your data's folder (datasets/README.md shows each dataset's layout)."
        )
    check = DATASET_CHECKS.get(dataset.get("_target_"))
    if check is not None:
        options = OmegaConf.to_container(dataset, resolve=True)
        del options["_target_"]
        check(**options)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (lowest allowed, whether the lowest is allowed, highest allowed or None, what it is)
RANGES = {
    "batch_size": (1, True, None, "the global batch: images per training step"),
    "epochs": (1, True, None, "passes over the training data"),
    "optimizer.learning_rate": (0, False, None, "the optimizer's step size, e.g. 1e-3"),
    "task.dropout_rate": (0, True, 1, "the share of features dropped in training, below 1"),
    "task.fine_tune_epochs": (0, True, None, "epochs of fine-tuning after the head (0: none)"),
    "task.fine_tune_learning_rate": (0, False, None, "the fine-tuning step size, e.g. 1e-5"),
    "task.augmented_views": (0, True, None, "augmented copies cached per training image (0: none)"),
}


def check_run_config(cfg: Any) -> None:
    """Checks the ranges types cannot express, naming the key and what it allows; fixes int learning rates.

    Runs before anything is built, so `batch_size=0` or `epochs=-3` stop at once with one line
    instead of a ZeroDivisionError after caching or an untrained model that looks finished.
    A learning rate typed as an integer (`optimizer.learning_rate=1`) becomes a float, as Keras requires.

    Args:
        cfg: the composed `conf/train.yaml`.

    Raises:
        ValueError: a value is out of its range or not a number.
    """
    for key, (low, low_allowed, high, meaning) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue  # absent from this task, or null
        if key.endswith("learning_rate") and OmegaConf.is_dict(value):
            continue  # a learning-rate schedule: Keras checks it
        bound = f">= {low}" if low_allowed else f"> {low}"
        allowed = f"{bound} and < {high}" if high is not None else bound
        if not _number(value) or value < low or (value == low and not low_allowed) or (
                high is not None and value >= high):
            raise ValueError(f"{key}={value!r} is out of range: it must be a number {allowed} ({meaning}). "
                             f"Set {key}=<value> on the command line or in the config.")
        if key.endswith("learning_rate") and isinstance(value, int):
            OmegaConf.update(cfg, key, float(value))

