"""Classify image files: an ImageNet backbone's top-k classes by name, or a transfer run's `model.keras`."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from pipeline.files import as_list, atomic_write_text
from pipeline.imagenet import NUM_CLASSES, imagenet_class_names  # no TensorFlow behind it

if TYPE_CHECKING:  # annotations only
    import keras
    import tensorflow as tf

    from pipeline.backbones import Backbone

# Keras and TensorFlow are imported where they are used: `model=<run>/export/model.onnx` (or .tflite)
# classifies with onnxruntime or LiteRT alone, without the seconds TensorFlow takes to load.

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
    import tensorflow as tf

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
        import tensorflow as tf

        from pipeline.data import decode_image, tf_paths

        @tf.autograph.experimental.do_not_convert  # AutoGraph would leave a module file in /tmp
        def load(path):
            image = decode_image(tf.io.read_file(path))
            if self.image_size is None:
                return image
            return central_crop(image, self.image_size, self.crop_fraction)

        images = tf.data.Dataset.from_tensor_slices(tf_paths(paths)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
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
    import keras

    from pipeline.layers import ImagePreprocessing

    warn_if_random(backbone)
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


def warn_if_random(backbone: Backbone) -> None:
    """Warns that `backbone.weights=null` makes a classifier of random weights: every class near 1/1000."""
    if backbone.weights is None:
        log.warning("backbone.weights=null: %s's classifier has random weights, so every class gets about "
                    "%.4f and the names below mean nothing. Use backbone.weights=imagenet (offline: "
                    "backbone=mobilenet_v1, mobilenet_v2_torchvision or efficientnet_lite0).",
                    backbone.name, 1 / NUM_CLASSES)


def class_names_beside(model_path: str | os.PathLike) -> list[str]:
    """The class names of a training run, in its `model.keras`'s output order, from files beside it.

    `class_names.json` (a JSON list) if the run wrote one, else the header row of
    `confusion_matrix.csv`: `true \\ predicted, <class 0>, <class 1>, ...`. For a checkpoint in a
    run's `checkpoints/`, the files of the run folder above it.
    """
    folder = Path(model_path).parent
    if folder.name == "checkpoints" and not (folder / "class_names.json").is_file():
        folder = folder.parent  # a run's checkpoints/best.keras: the names are in the run folder
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

    A task=classification checkpoint (`checkpoints/best.keras`, images at the run's `image_size`)
    is wrapped in the same resize; a task=transfer checkpoint (the head on feature maps) is refused
    with the path of the run's `model.keras`.

    Args:
        model_path: the run's `model.keras`, or a task=classification run's checkpoint.
        class_names: names in output order; None reads them from the run's `confusion_matrix.csv`.
    """
    import keras

    import pipeline  # noqa: F401  registers the custom layers for safe loading

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model={model_path!r} does not exist; give a run's model.keras.")
    model = keras.saving.load_model(model_path, safe_mode=True)
    shape = model.input_shape
    if len(shape) != 4 or shape[-1] != 3:
        run_dir = Path(model_path).parent.parent if Path(model_path).parent.name == "checkpoints" else None
        raise ValueError(
            f"{model_path} takes inputs of shape {tuple(shape[1:])}, not RGB images: a task=transfer "
            "checkpoint is the head alone, trained on the backbone's cached feature maps. Pass the run's "
            f"model.keras ({run_dir / 'model.keras' if run_dir else 'in the run folder'}), the whole "
            "classifier on images."
        )
    if shape[1] is not None and shape[2] is not None:
        # A task=classification checkpoint takes float images at the run's image_size: resize whole
        # images exactly as training and the exported model.keras do (bilinear, no crop).
        inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
        resized = keras.layers.Resizing(shape[1], shape[2], interpolation="bilinear", name="resize")(inputs)
        model = keras.Model(inputs, model(resized), name=model.name)
    names = list(class_names) if class_names is not None else class_names_beside(model_path)
    if len(names) != model.output_shape[-1]:
        raise ValueError(
            f"{model_path} has {model.output_shape[-1]} outputs but {len(names)} class names were given "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})."
        )
    return Classifier(model, names, image_size=None)


RUNTIME_SUFFIXES = (".onnx", ".tflite")  # exported files predicted without TensorFlow


@dataclass
class RuntimeClassifier:
    """An exported `model.onnx` (onnxruntime) or `model.tflite` (LiteRT) with the run's class names.

    Args:
        run: uint8 `[1, height, width, 3]` -> `[1, classes]` probabilities (`pipeline.export.runtimes`).
        class_names: one name per output.
        image_size: `(height, width)` a fixed-size `.tflite` takes (images are resized to it), or None.
    """

    run: object
    class_names: list[str]
    image_size: tuple[int, int] | None = None

    @classmethod
    def open(cls, model_path: str | os.PathLike, class_names: list[str] | None = None) -> "RuntimeClassifier":
        """Opens `model_path`; names from `class_names`, else `labels.txt` beside it, else the run folder's."""
        from pipeline.export.runtimes import litert_input_size, runner_for

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model={model_path!r} does not exist; give a run's export/model.onnx or "
                                    "export/model.tflite (python export.py run_dir=<run> writes them).")
        if class_names is None:
            labels = path.parent / "labels.txt"
            class_names = (labels.read_text(encoding="utf-8").splitlines() if labels.is_file()
                           else class_names_beside(path.parent))
        size = litert_input_size(path) if path.suffix == ".tflite" else None
        return cls(runner_for(path), list(class_names), size)

    def unreadable(self, paths: list[str]) -> list[tuple[str, str]]:
        """(path, reason) of each file Pillow cannot decode."""
        from PIL import Image

        bad = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception as error:  # noqa: BLE001  Pillow raises many kinds for a bad file
                bad.append((path, f"{type(error).__name__}: {error}"))
        return bad

    def probabilities(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        """[len(paths), classes] probabilities, one image at a time at its own size (or the fixed one)."""
        from PIL import Image

        from pipeline.export.runtimes import read_rgb

        outputs = []
        for path in paths:
            image = read_rgb(path)
            if self.image_size is not None:
                height, width = self.image_size
                image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
            output = np.asarray(self.run(image[None]))
            if output.ndim != 2:
                raise ValueError(f"The model gives per-pixel scores {output.shape} (a segmentation run); "
                                 "predict.py classifies whole images.")
            if output.shape[-1] != len(self.class_names):
                raise ValueError(f"The model has {output.shape[-1]} outputs but {len(self.class_names)} class "
                                 "names were given.")
            outputs.append(output)
        return np.concatenate(outputs).astype(np.float64)


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
    class_names = list(cfg.class_names) if cfg.class_names else None
    if cfg.model and Path(cfg.model).suffix in RUNTIME_SUFFIXES:
        classifier = RuntimeClassifier.open(cfg.model, class_names)
        bad = dict(classifier.unreadable(paths))
    else:
        from hydra.utils import instantiate

        from pipeline.data import find_bad_images

        if cfg.model:
            classifier = exported_classifier(cfg.model, class_names)
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
    log.info("Classified %d image(s) (%d unreadable) with %s; wrote %s", len(readable), len(bad),
             cfg.model or cfg.backbone.name, output)
    return results
