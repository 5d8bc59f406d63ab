"""Classify image files: an ImageNet backbone's top-k classes by name, or a transfer run's `model.keras`."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.backbones import Backbone
from pipeline.data import decode_image, find_bad_images
from pipeline.files import as_list, atomic_write_text
from pipeline.imagenet import NUM_CLASSES, imagenet_class_names
from pipeline.layers import ImagePreprocessing

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def find_images(inputs: str | list[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files named in `inputs`: files as given, folders searched recursively (sorted, hidden skipped).

    Args:
        inputs: image files and folders, or one of them.
        extensions: what counts as an image inside a folder (any case).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no inputs, or no image among them.
    """
    inputs = as_list(inputs)
    if not inputs:
        raise ValueError("No inputs: give image files or folders, e.g. inputs=[photo.jpg,photos/].")
    found = []
    for entry in inputs:
        path = Path(entry)
        if path.is_file():
            found.append(str(path))
        elif path.is_dir():
            for directory, folders, files in os.walk(path):
                folders[:] = sorted(name for name in folders if not name.startswith("."))
                found += [os.path.join(directory, name) for name in sorted(files)
                          if not name.startswith(".") and name.lower().endswith(extensions)]
        else:
            raise FileNotFoundError(f"Input {entry!r} is neither a file nor a folder.")
    if not found:
        raise ValueError(f"No images ({', '.join(extensions)}) in {', '.join(map(str, inputs))}.")
    return found


def central_crop(image: tf.Tensor, size: tuple[int, int], crop_fraction: float) -> tf.Tensor:
    """The central region of `image` with `size`'s aspect ratio, resized to `size` (float32, 0-255).

    The region spans `crop_fraction` of the largest such rectangle that fits: 0.875 (224 of 256) is
    what torchvision, TF-Slim and TensorFlow's EfficientNet evaluate ImageNet with (resize the short
    side to 256, keep the central 224). Resizing is bilinear with antialiasing, like PIL's.

    Args:
        image: [height, width, 3] RGB.
        size: `(height, width)` of the result.
        crop_fraction: in (0, 1]; 1 keeps the largest centred rectangle.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.constant(size, tf.float32)
    scale = tf.reduce_min(shape / target) * crop_fraction
    crop = tf.maximum(tf.cast(tf.round(target * scale), tf.int32), 1)
    offset = (tf.shape(image)[:2] - crop) // 2
    region = image[offset[0] : offset[0] + crop[0], offset[1] : offset[1] + crop[1]]
    return tf.image.resize(tf.cast(region, tf.float32), size, method="bilinear", antialias=True)


@dataclass
class Classifier:
    """A model and what it needs to read image files.

    Args:
        model: RGB batch -> class probabilities.
        class_names: one name per output.
        image_size: `(height, width)` images are cropped to; None feeds whole uint8 images one at a
            time (an exported `model.keras` resizes inside).
        crop_fraction: see `central_crop`.
    """

    model: keras.Model
    class_names: list[str]
    image_size: tuple[int, int] | None = None
    crop_fraction: float = 0.875

    def dataset(self, paths: list[str], batch_size: int) -> tf.data.Dataset:
        """Decoded (and cropped) images in `paths` order, batched."""
        def load(path):
            image = decode_image(tf.io.read_file(path))
            if self.image_size is None:
                return image
            return central_crop(image, self.image_size, self.crop_fraction)

        images = tf.data.Dataset.from_tensor_slices(list(paths)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        return images.batch(batch_size if self.image_size else 1).prefetch(tf.data.AUTOTUNE)

    def probabilities(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        """[len(paths), classes] probabilities, in `paths` order."""
        outputs = [np.asarray(self.model(batch, training=False)) for batch in self.dataset(paths, batch_size)]
        return np.concatenate(outputs).astype(np.float64)


def imagenet_classifier(backbone: Backbone, crop_fraction: float = 0.875) -> Classifier:
    """The backbone's 1000-class ImageNet classifier on RGB in [0, 255], with its own preprocessing.

    Args:
        backbone: a backbone whose weights include the classifier (`include_top`).
        crop_fraction: central crop before resizing to the backbone's `input_size`.
    """
    network = backbone.build(include_top=True)
    if network.output_shape[-1] != NUM_CLASSES:
        raise ValueError(
            f"Backbone {backbone.name!r} with weights {backbone.weights!r} has {network.output_shape[-1]} "
            f"outputs, not the {NUM_CLASSES} ImageNet classes. For a model trained on your own classes, "
            f"pass model=/path/to/model.keras."
        )
    inputs = keras.Input((*backbone.input_size, 3), name="image")
    x = ImagePreprocessing(backbone.preprocessing, name="preprocessing")(inputs)
    model = keras.Model(inputs, network(x, training=False), name=f"{backbone.name}_imagenet")
    return Classifier(model, list(imagenet_class_names()), tuple(backbone.input_size), crop_fraction)


def class_names_beside(model_path: str | os.PathLike) -> list[str]:
    """The class names of a training run, in its `model.keras`'s output order, from files beside it.

    `class_names.json` (a JSON list) if the run wrote one, else the header row of
    `confusion_matrix.csv`: `true \\ predicted, <class 0>, <class 1>, ...`.
    """
    folder = Path(model_path).parent
    if (folder / "class_names.json").is_file():
        return [str(name) for name in json.loads((folder / "class_names.json").read_text(encoding="utf-8"))]
    matrix = folder / "confusion_matrix.csv"
    if not matrix.is_file():
        raise FileNotFoundError(
            f"No class_names.json or confusion_matrix.csv beside {model_path} to read the class names "
            f"from. Pass them in the model's output order: class_names=[name0,name1,...]."
        )
    with open(matrix, newline="", encoding="utf-8") as file:
        header = next(csv.reader(file), [])
    return header[1:]


def exported_classifier(model_path: str | os.PathLike, class_names: list[str] | None = None) -> Classifier:
    """A `model.keras` written by a training run: uint8 RGB of any size in, its own classes out.

    Args:
        model_path: the run's `model.keras`.
        class_names: names in output order; None reads them from the run's `confusion_matrix.csv`.
    """
    import pipeline.layers  # noqa: F401  registers ImagePreprocessing for safe loading

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model={model_path!r} does not exist; give a run's model.keras.")
    names = list(class_names) if class_names is not None else class_names_beside(model_path)
    model = keras.saving.load_model(model_path, safe_mode=True)
    if len(names) != model.output_shape[-1]:
        raise ValueError(
            f"{model_path} has {model.output_shape[-1]} outputs but {len(names)} class names were given "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})."
        )
    return Classifier(model, names, image_size=None)


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices by decreasing probability; ties go to the lower index, like `np.argmax`."""
    return np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]


def prediction_records(paths: list[str], probabilities: np.ndarray, class_names: list[str],
                       k: int) -> list[dict]:
    """One `{"path", "top_k": [{"index", "name", "probability"}, ...]}` per image."""
    best = top_k(probabilities, min(k, probabilities.shape[-1]))
    return [
        {"path": path, "top_k": [{"index": int(index), "name": class_names[index],
                                  "probability": float(row[index])} for index in indices]}
        for path, row, indices in zip(paths, probabilities, best)
    ]


def format_table(records: list[dict]) -> str:
    """Each image's path, then one line per class: rank, index, probability, name."""
    lines = []
    for record in records:
        lines.append(record["path"])
        if "error" in record:
            lines.append(f"  not readable: {record['error']}")
        for rank, entry in enumerate(record.get("top_k", []), start=1):
            lines.append(f"  {rank}. {entry['index']:>4}  {entry['probability']:.4f}  {entry['name']}")
    return "\n".join(lines)


def predict(cfg: DictConfig) -> list[dict]:
    """Classifies `cfg.inputs` and writes `predictions.json` into the run folder.

    Args:
        cfg: the composed `conf/predict.yaml`.

    Returns:
        The records written: each image's path and its top-k classes (or the reason it was skipped).
    """
    paths = find_images(cfg.inputs)
    if cfg.model:
        classifier = exported_classifier(cfg.model, list(cfg.class_names) if cfg.class_names else None)
    else:
        classifier = imagenet_classifier(instantiate(cfg.backbone), cfg.crop_fraction)
    bad = dict(find_bad_images(paths))
    for path, reason in bad.items():
        log.warning("Skipping unreadable image %s: %s", path, reason)
    readable = [path for path in paths if path not in bad]
    probabilities = classifier.probabilities(readable, cfg.batch_size) if readable else np.zeros((0, 1))
    records = dict(zip(readable, prediction_records(readable, probabilities, classifier.class_names, cfg.top_k)))
    results = [records.get(path, {"path": path, "error": bad.get(path)}) for path in paths]
    output = Path(cfg.paths.output_dir) / "predictions.json"
    atomic_write_text(output, json.dumps(results, indent=2) + "\n")
    return results
