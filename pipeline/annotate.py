"""Annotate images: an ImageNet classifier run fully convolutionally over the whole image (where is what).

The classifier's dense layers are recast as convolutions over the stride-32 feature map (Long et al.,
FCN, section 3.1): VGG16's fc6, a dense layer over the flattened 7x7x512 pool5 map, becomes a 7x7
convolution and fc7 / fc8 1x1 convolutions; a pooling + dense head (MobileNet, EfficientNet) becomes a
1x1 convolution on the last feature map (averaging commutes with the linear layer, so the mean of
the cells' logits is the classifier's logits). At 224x224 the recast VGG16 gives exactly the dense
VGG16's output; on a larger image it gives a map of class scores, one cell per 32 pixels.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image

from pipeline.backbones import Backbone
from pipeline.data import decode_error, decode_image
from pipeline.files import atomic_path, atomic_write_bytes, atomic_write_text
from pipeline.imagenet import NUM_CLASSES, imagenet_class_names, short_name
from pipeline.importers.convert import copy_matching_layers
from pipeline.layers import ImagePreprocessing
from pipeline.models import STRIDE
from pipeline.predict import find_images, warn_if_random
from pipeline.reports import render_png

log = logging.getLogger(__name__)


_SKIPPED = (keras.layers.Dropout, keras.layers.Reshape, keras.layers.InputLayer)


@dataclass
class FullyConvolutional:
    """A classifier recast to run on any image size.

    Args:
        model: RGB in [0, 255] of any size (sides multiples of 32) -> [rows, columns, classes] softmax
            scores, one cell per 32 pixels.
        window: side, in cells, of the first recast layer's kernel (7 for VGG16's fc6, 1 for a pooling
            head): cell (i, j) sees the window of `window` x `window` feature cells starting at (i, j).
        class_names: one name per class.
    """

    model: keras.Model
    window: int
    class_names: list[str]

    @property
    def minimum_side(self) -> int:
        """The smallest image side that gives one cell: 224 for VGG16, 32 for a pooling head."""
        return STRIDE * self.window


def _activation(config: dict) -> str:
    activation = config.get("activation", "linear")
    return activation if isinstance(activation, str) else activation.get("config", {}).get("name", "?")


def _recast_head(classifier: keras.Model, feature_layer: str, x, pooling_window: int = 1) -> tuple[object, int]:
    """Applies the classifier's layers after `feature_layer` to the feature map `x` as convolutions.

    Returns the logits tensor (the last softmax is left out) and the first dense layer's window.
    Global average pooling becomes nothing (`pooling_window` 1: the head sees each cell alone) or an
    average over `pooling_window` x `pooling_window` cells (7 at 224x224: each cell then sees what
    the classifier sees on the 224x224 crop around it).
    Weights are copied, reshaped: a dense kernel (h * w * c, units) over a flattened (h, w, c) map is
    the (h, w, c, units) convolution kernel, since Flatten orders row, column, channel.
    """
    names = [layer.name for layer in classifier.layers]
    if feature_layer not in names:
        raise ValueError(f"{classifier.name!r} has no layer {feature_layer!r} to cut at.")
    window, first_window = (1, 1), None
    for layer in classifier.layers[names.index(feature_layer) + 1 :]:
        config = layer.get_config()
        if isinstance(layer, _SKIPPED):
            continue
        if isinstance(layer, keras.layers.Flatten):
            window = tuple(layer.input.shape[1:3])
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            window = (1, 1)
            if pooling_window > 1:
                x = keras.layers.AveragePooling2D(pooling_window, strides=1, name=f"{layer.name}_window")(x)
                first_window = (pooling_window, pooling_window)
        elif isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            weights = layer.get_weights()
            if isinstance(layer, keras.layers.Conv2D):
                if tuple(layer.kernel_size) != (1, 1):
                    raise ValueError(f"Cannot recast {layer.name!r}: only 1x1 convolutions follow the feature map.")
                kernel = weights[0]
            else:
                kernel = weights[0].reshape(*window, -1, weights[0].shape[-1])
            convolution = keras.layers.Conv2D(kernel.shape[-1], kernel.shape[:2], use_bias=len(weights) > 1,
                                              kernel_initializer="zeros",  # overwritten: skip a random init
                                              dtype=layer.dtype_policy, name=f"{layer.name}_conv")
            x = convolution(x)
            convolution.set_weights([kernel, *weights[1:]])
            first_window = first_window or window
            window = (1, 1)
            activation = _activation(config)
            if activation not in ("linear", "softmax"):
                x = keras.layers.Activation(activation, name=f"{layer.name}_{activation}")(x)
        elif isinstance(layer, keras.layers.Activation) and _activation(config) == "softmax":
            continue  # the softmax over classes is applied by the caller, per cell
        else:
            raise ValueError(
                f"Cannot recast layer {layer.name!r} ({type(layer).__name__}) of {classifier.name!r} as a "
                f"convolution: the head after {feature_layer!r} may hold only Flatten or global average "
                f"pooling, dropout, reshape, dense and 1x1 convolution layers."
            )
    if first_window is None:
        raise ValueError(f"{classifier.name!r} has no dense classifier after {feature_layer!r}.")
    if first_window[0] != first_window[1]:
        raise ValueError(f"Only square windows are supported; the first dense layer sees {first_window}.")
    return x, first_window[0]


def recast(classifier: keras.Model, base: keras.Model, feature_layer: str, preprocessing: str,
           pooling_window: int = 1, class_names: list[str] | None = None) -> FullyConvolutional:
    """A dense classifier as a fully convolutional model on top of `base`.

    Args:
        classifier: the whole classifier (e.g. `keras.applications.VGG16(include_top=True)`).
        base: the same network up to `feature_layer`, built for any input size, with the same weights.
        feature_layer: the last layer before the classifier's head (`block5_pool` for VGG16).
        preprocessing: the `ImagePreprocessing` mode put in front.
        pooling_window: for a global-average-pooling head, the cells each output cell averages
            (1: the dense head as a 1x1 convolution on the feature map).
        class_names: one per class; None: the ImageNet names.
    """
    inputs = keras.Input((None, None, 3), name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs)
    x = base(x, training=False)
    logits, window = _recast_head(classifier, feature_layer, x, pooling_window)
    scores = keras.layers.Softmax(axis=-1, dtype="float32", name="class_scores")(logits)
    model = keras.Model(inputs, scores, name=f"{base.name}_fully_convolutional")
    return FullyConvolutional(model, window, list(class_names or imagenet_class_names()))


def fully_convolutional(backbone: Backbone, pooling_window: int = 1) -> FullyConvolutional:
    """The backbone's ImageNet classifier with its dense layers recast as convolutions.

    Args:
        backbone: a backbone whose weights include the classifier; its `feature_layer` is where the
            head starts (VGG16: `block5_pool`, then Flatten, fc1, fc2, predictions).
        pooling_window: for a global-average-pooling head, the cells each output cell averages
            (1: the dense head as a 1x1 convolution on the feature map).
    """
    warn_if_random(backbone)
    classifier = backbone.build(include_top=True)
    if classifier.output_shape[-1] != NUM_CLASSES:
        raise ValueError(f"Backbone {backbone.name!r} has {classifier.output_shape[-1]} outputs, not the "
                         f"{NUM_CLASSES} ImageNet classes annotate names.")
    base = backbone.build([None, None])  # the same layers, for any image size
    copy_matching_layers(classifier, base)
    return recast(classifier, base, backbone.feature_layer, backbone.preprocessing, pooling_window)


def working_size(height: int, width: int, minimum_side: int, max_side: int | None) -> tuple[int, int]:
    """The size an image is annotated at: sides multiples of 32, at least `minimum_side`, at most `max_side`.

    Args:
        height, width: the image's size.
        minimum_side: the smallest side that gives one cell (224 for VGG16).
        max_side: cap on the longer side (None: the full resolution).
    """
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    scale = max(scale, minimum_side / min(height, width))
    return tuple(max(minimum_side, STRIDE * round(side * scale / STRIDE)) for side in (height, width))


def upsample_scores(scores: np.ndarray, window: int, size: tuple[int, int]) -> np.ndarray:
    """Per-cell class scores [rows, columns, K] -> per-pixel scores [height, width, K].

    Cell (i, j) is centred on the centre of its receptive window, pixel 32 * i + 16 * window: the
    bilinear resize to 32 pixels per cell puts cell centres at 32 * i + 16, and an edge margin of
    16 * (window - 1) pixels on each side shifts them there (96 for VGG16's 7x7 fc6). Bilinear resize
    (`keras.ops.image.resize`) until the FCN issue's bilinear transposed convolution lands.

    Args:
        scores: softmax scores per cell.
        window: the recast classifier's window, in cells.
        size: `(height, width)` of the image the scores are for.
    """
    rows, columns, _ = scores.shape
    upsampled = np.asarray(keras.ops.image.resize(scores[None], (rows * STRIDE, columns * STRIDE),
                                                  interpolation="bilinear"))[0]
    margin = STRIDE // 2 * (window - 1)
    upsampled = np.pad(upsampled, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
    if upsampled.shape[:2] != tuple(size):
        upsampled = np.asarray(keras.ops.image.resize(upsampled[None], size, interpolation="bilinear"))[0]
    return upsampled


@dataclass
class Annotation:
    """What is where in one image.

    Args:
        scores: [rows, columns, classes] softmax scores per cell.
        coarse_map: [rows, columns] best class per cell.
        label_map: [height, width] best class per pixel, at the image's own size.
        classes: the classes present, largest share first: index, name, share of the image's pixels,
            best score in any cell.
    """

    scores: np.ndarray
    coarse_map: np.ndarray
    label_map: np.ndarray
    classes: list[dict]


def annotate_image(network: FullyConvolutional, image: np.ndarray, max_side: int | None = None) -> Annotation:
    """Runs the recast classifier over `image` and maps its cells back onto the pixels.

    Only the classes that win at least one cell compete per pixel (the others' scores are not
    upsampled: 1000 full-resolution score maps would not fit in memory).

    Args:
        network: from `fully_convolutional`.
        image: [height, width, 3] uint8 RGB.
        max_side: cap on the longer side it runs at (None: full resolution, rounded to 32).
    """
    height, width = image.shape[:2]
    size = working_size(height, width, network.minimum_side, max_side)
    pixels = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
    scores = np.asarray(network.model(pixels[None], training=False))[0]
    coarse_map = scores.argmax(axis=-1)
    present, counts = np.unique(coarse_map, return_counts=True)
    present = present[np.argsort(-counts, kind="stable")]
    per_pixel = upsample_scores(scores[..., present], network.window, (height, width))
    label_map = present[per_pixel.argmax(axis=-1)]
    indices, pixels_per_class = np.unique(label_map, return_counts=True)
    share = dict(zip(indices.tolist(), (pixels_per_class / label_map.size).tolist()))
    classes = [{"index": int(index), "name": network.class_names[index], "share": share.get(int(index), 0.0),
                "best_score": float(scores[..., index].max())} for index in present]
    classes.sort(key=lambda entry: (-entry["share"], -entry["best_score"]))
    return Annotation(scores, coarse_map, label_map, classes)


def plot_annotation(image: np.ndarray, annotation: Annotation, max_classes: int = 10, title: str = "") -> Figure:
    """The image beside its label map in discrete colours, with a colour bar naming each class.

    Args:
        image: [height, width, 3] RGB.
        annotation: from `annotate_image`.
        max_classes: classes with their own colour, largest share first; the rest share one grey "other".
        title: figure title.
    """
    shown = [entry for entry in annotation.classes if entry["share"] > 0][:max_classes]
    palette = [tuple(colour) for colour in _palette(len(shown))]
    labels = [f"{short_name(entry['name'])} ({100 * entry['share']:.0f} %)" for entry in shown]
    codes = np.full(annotation.label_map.shape, len(shown), dtype=np.int32)  # "other" by default
    for code, entry in enumerate(shown):
        codes[annotation.label_map == entry["index"]] = code
    if (codes == len(shown)).any():
        palette.append((0.85, 0.85, 0.85))
        others = len([entry for entry in annotation.classes if entry["share"] > 0]) - len(shown)
        labels.append(f"other ({others} {'class' if others == 1 else 'classes'}, "
                      f"{100 * (codes == len(shown)).mean():.0f} %)")

    height, width = image.shape[:2]
    figure = Figure(figsize=(2 * 5.0 * width / max(height, width) + 3.0, 5.0 * height / max(height, width) + 0.8))
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    left.set_title("image")
    colours = ListedColormap(palette)
    shown_map = right.imshow(codes, cmap=colours, norm=BoundaryNorm(np.arange(len(palette) + 1) - 0.5, len(palette)),
                             interpolation="nearest")
    right.set_title(f"classes ({annotation.coarse_map.shape[0]}x{annotation.coarse_map.shape[1]} cells)")
    for axes in (left, right):
        axes.set_xticks([])
        axes.set_yticks([])
    bar = figure.colorbar(shown_map, ax=right, ticks=np.arange(len(palette)), fraction=0.046, pad=0.04)
    bar.ax.set_yticklabels(labels, fontsize=9)
    bar.ax.invert_yaxis()  # the largest class on top
    if title:
        figure.suptitle(title)
    return figure


def _palette(count: int) -> np.ndarray:
    """Distinct colours, none grey (grey is "other"): tab20's dark then light halves, greys left out."""
    from matplotlib import colormaps

    order = [i for i in range(0, 20, 2) if i != 14] + [i for i in range(1, 20, 2) if i != 15]
    return colormaps["tab20"](np.resize(order, count))[:, :3]


def write_annotation(folder: Path, path: str, image: np.ndarray, annotation: Annotation, window: int,
                     max_classes: int) -> dict:
    """Writes `annotation.png` and `labels.png` (16-bit ImageNet index per pixel) into `folder`; returns the record."""
    # A name that is not valid UTF-8 is drawn with replacement characters (matplotlib refuses surrogates).
    title = Path(path).name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    figure = plot_annotation(image, annotation, max_classes, title=title)
    atomic_write_bytes(folder / "annotation.png", render_png(figure))
    with atomic_path(folder / "labels.png") as temporary:
        Image.fromarray(annotation.label_map.astype(np.uint16)).save(temporary, format="PNG")
    return {
        "path": path,
        "image_size": list(image.shape[:2]),
        "map_size": list(annotation.coarse_map.shape),
        "window": window,
        "classes": annotation.classes,
        "coarse_class_map": annotation.coarse_map.tolist(),
        "annotation_png": str(folder / "annotation.png"),
        "labels_png": str(folder / "labels.png"),
    }


def annotate(cfg: DictConfig) -> list[dict]:
    """Annotates `cfg.inputs` and writes, per image, `<name>/annotation.png` and `<name>/labels.png`,
    and `annotations.json` for all, into the run folder.

    Args:
        cfg: the composed `conf/annotate.yaml`.

    Returns:
        The records of `annotations.json`.
    """
    paths = find_images(cfg.inputs)
    network = fully_convolutional(instantiate(cfg.backbone), cfg.pooling_window)
    output_dir = Path(cfg.paths.output_dir)
    records, folders = [], set()
    for path in paths:
        try:
            image = decode_image(tf.io.read_file(os.fsencode(path))).numpy()  # any file name's bytes
        except tf.errors.OpError:
            reason = decode_error(path) or "could not be decoded"  # the decoder's reason, without op text
            log.warning("Skipping unreadable image %s: %s", path, reason)
            records.append({"path": path, "error": reason})
            continue
        name = Path(path).stem
        folder, copy = name, 1
        while folder in folders:  # two inputs with one file name: photo, photo_2, ...
            copy += 1
            folder = f"{name}_{copy}"
        folders.add(folder)
        annotation = annotate_image(network, image, cfg.max_side)
        records.append(write_annotation(output_dir / folder, path, image, annotation, network.window,
                                        cfg.max_classes))
    atomic_write_text(output_dir / "annotations.json", json.dumps(records, indent=2) + "\n")
    log.info("Annotated %d image(s) with %s; wrote %s", sum("error" not in record for record in records),
             cfg.backbone.name, output_dir / "annotations.json")
    return records


def format_classes(records: list[dict], limit: int = 8) -> str:
    """Per image: the map size, then the classes present with their share and best score."""
    lines = []
    for record in records:
        if "error" in record:
            lines.append(f"{record['path']}\n  not readable: {record['error']}")
            continue
        rows, columns = record["map_size"]
        lines.append(f"{record['path']}  ({record['image_size'][0]}x{record['image_size'][1]} pixels, "
                     f"{rows}x{columns} cells)")
        lines.append("  share  best   class")
        for entry in record["classes"][:limit]:
            lines.append(f"  {100 * entry['share']:4.0f} %  {entry['best_score']:.3f}  {entry['index']:>4} "
                         f"{entry['name']}")
        if len(record["classes"]) > limit:
            lines.append(f"  ... and {len(record['classes']) - limit} more classes")
    return "\n".join(lines)
