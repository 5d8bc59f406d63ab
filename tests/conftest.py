"""Shared fixtures: the real conf/ composed with Hydra, and a tiny folder of real photos."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import pipeline.schema  # noqa: F401  registers train_schema, as train.py does

CONF = Path(__file__).resolve().parents[1] / "conf"
CLASSES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def compose_config(overrides: list[str], tmp_path: Path) -> "omegaconf.DictConfig":
    """The real conf/train.yaml with `overrides`, its folders moved under `tmp_path`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"paths.root={tmp_path}",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.resume_dir={tmp_path / 'resume'}",
                *overrides,
            ],
        )


def write_photo_folder(root: Path, images_per_class: int = 12, size: int = 48) -> Path:
    """Crops of real scikit-image photos, one class per photo, as JPEG and PNG files."""
    from skimage import data

    rng = np.random.default_rng(0)
    for class_name, photo in CLASSES.items():
        pixels = getattr(data, photo)()
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            top = rng.integers(0, pixels.shape[0] - 2 * size)
            left = rng.integers(0, pixels.shape[1] - 2 * size)
            crop = Image.fromarray(pixels[top : top + 2 * size, left : left + 2 * size]).resize((size, size))
            extension = ".png" if i % 4 == 0 else (".JPG" if i % 4 == 1 else ".jpg")
            crop.save(folder / f"{class_name}_{i:03d}{extension}", quality=90)
    return root


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    return write_photo_folder(tmp_path / "photos")


@pytest.fixture(scope="session", autouse=True)
def shared_jax_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for every JAX process the tests start.

    Each new JAX process compiles again what the last one did: Keras initialises every weight before
    loading or training (one compilation per weight shape), then compiles its steps; 15-20 s of each
    `train.py` / `predict.py` under KERAS_BACKEND=jax on 2 cores. The processes inherit this
    environment; the first one of a session still compiles everything.
    """
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-compilation-cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the initialisers take 0.5 s each
    yield


@pytest.fixture(autouse=True)
def fresh_keras_session():
    yield
    keras.backend.clear_session()


# Fast settings for end-to-end runs: random MobileNet at 64x64, one epoch, big splits.
TINY = [
    "backbone=mobilenet",
    "backbone.weights=null",
    "debug=tiny",
    "dataset=folder",
    "dataset.validation_percent=25",
    "dataset.test_percent=25",
]


def write_bad_layout(kind: str, root: Path) -> Path:
    """A data root a new user might give by mistake (files are empty: the checks open none of them).

    Args:
        kind: "one_class", "empty_class" (a class folder holding only a .txt), "no_classes",
            "loose_images" (images in the root itself), "voc_without_jpegimages",
            "voc_without_lists", "voc_without_masks", "coco_without_annotations".
        root: the folder to write.
    """
    files = {
        "one_class": ["cat/a.jpg"],
        "empty_class": ["cat/a.jpg", "dog/notes.txt"],
        "no_classes": [],
        "loose_images": ["a.jpg", "b.JPG"],
        "voc_without_jpegimages": ["SegmentationClass/a.png"],
        "voc_without_lists": ["JPEGImages/a.jpg", "SegmentationClass/a.png"],
        "voc_without_masks": ["JPEGImages/a.jpg", "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt"],
        "coco_without_annotations": ["train2017/a.jpg", "val2017/b.jpg"],
    }[kind]
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root
