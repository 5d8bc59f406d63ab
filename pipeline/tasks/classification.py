"""Image classification trained end to end: backbone + head on images, augmented in tf.data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones import Backbone, unfreeze_top
from pipeline.data import ImageFolder, Split, find_bad_images, handle_bad_images, load_images
from pipeline.layers import ImagePreprocessing
from pipeline.reports import write_classification_reports


@dataclass
class TaskData:
    """The datasets `model.fit` and evaluation read, and the examples behind them.

    Args:
        train: shuffled (input, label) batches.
        validation: unshuffled batches in `splits["validation"]` order.
        test: unshuffled batches in `splits["test"]` order.
        splits: the readable examples of each split, in dataset order.
        skipped: (path, reason) of every unreadable image left out.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    splits: dict[str, Split]
    skipped: list[tuple[str, str]]


def build_head(
    feature_shape: tuple[int, ...], num_classes: int, dropout_rate: float, pooling: str
) -> keras.Model:
    """Pooling, dropout and a softmax dense layer (in float32, also under mixed precision)."""
    pools = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    if pooling not in pools:
        raise ValueError(f"task.pooling must be 'avg' or 'max'; got {pooling!r}.")
    features = keras.Input(feature_shape, name="features")
    x = pools[pooling](name="pool")(features)
    x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(features, outputs, name="head")


class ClassificationTask:
    """Backbone and head trained together on images.

    Args:
        backbone: the pretrained (or randomly initialised) base.
        dataset: the folder-per-class images.
        image_size: `[height, width]` the model sees.
        dropout_rate: dropout before the classifier.
        pooling: "avg" or "max" over the stride-32 feature map.
        trainable_layers: layers of the base to train, counted from the top: 0 keeps it frozen,
            -1 trains all of it (use -1 with `backbone.weights=null` to train from scratch).
        augmentation: Keras preprocessing layers applied to training batches in tf.data.
        seed: shuffling seed.
    """

    loss = "sparse_categorical_crossentropy"
    fine_tune_epochs = 0  # only the transfer task has a second, fine-tuning phase

    def __init__(
        self,
        backbone: Backbone,
        dataset: ImageFolder,
        image_size: list[int],
        dropout_rate: float = 0.2,
        pooling: str = "avg",
        trainable_layers: int = 0,
        augmentation: list[keras.layers.Layer] | None = None,
        seed: int = 0,
    ):
        self.backbone = backbone
        self.dataset = dataset
        self.image_size = tuple(image_size)
        self.dropout_rate = dropout_rate
        self.pooling = pooling
        self.trainable_layers = trainable_layers
        self.augmentation = keras.Sequential(augmentation, name="augmentation") if augmentation else None
        self.seed = seed
        # One resize layer for training data and the exported model, so both resize identically.
        self.resizing = keras.layers.Resizing(*self.image_size, interpolation="bilinear", name="resize")

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def metrics(self) -> list:
        k = min(5, self.num_classes)
        return ["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k, name=f"top_{k}_accuracy")]

    def head(self, feature_shape: tuple[int, ...]) -> keras.Model:
        return build_head(feature_shape, self.num_classes, self.dropout_rate, self.pooling)

    def classifier(self, base: keras.Model, head: keras.Model) -> keras.Model:
        """Float RGB images at `image_size` -> class probabilities."""
        inputs = keras.Input((*self.image_size, 3), name="image")
        x = ImagePreprocessing(self.backbone.preprocessing, name="preprocessing")(inputs)
        # Pretrained BatchNorm statistics stay in inference mode even when layers are unfrozen;
        # a base trained from scratch needs its BatchNorm to learn.
        x = base(x, training=False) if self.backbone.weights is not None else base(x)
        return keras.Model(inputs, head(x), name=f"{self.backbone.name}_classifier")

    def build_model(self) -> keras.Model:
        base = self.backbone.build(self.image_size)
        if self.trainable_layers:
            unfreeze_top(base, self.trainable_layers)
        return self.classifier(base, self.head(base.output_shape[1:]))

    def readable_splits(self) -> tuple[dict[str, Split], list[tuple[str, str]]]:
        """The splits less the images the decoder cannot read, and those images with reasons."""
        splits = self.dataset.splits
        paths = [path for split in splits.values() for path in split.relative_paths]
        relative = dict(zip(self.dataset.absolute(paths), paths))
        bad = find_bad_images(list(relative))
        handle_bad_images(bad, self.dataset.on_bad_image)
        unreadable = {relative[path] for path, _ in bad}
        return {name: split.without(unreadable) for name, split in splits.items()}, bad

    def datasets(self, batch_size: int) -> TaskData:
        """Image datasets: decode, resize, batch, prefetch; shuffled and augmented for training."""
        splits, skipped = self.readable_splits()
        check_splits(splits)

        def images(split: Split) -> tf.data.Dataset:
            paths = split.relative_paths
            pixels = load_images(self.dataset.absolute(paths), self.dataset.orientations(paths),
                                 self.image_size, self.resizing)
            return tf.data.Dataset.zip(pixels, tf.data.Dataset.from_tensor_slices(split.labels))

        train = images(splits["train"]).shuffle(len(splits["train"]), seed=self.seed).batch(batch_size)
        if self.augmentation is not None:
            train = train.map(lambda x, y: (self.augmentation(x, training=True), y),
                              num_parallel_calls=tf.data.AUTOTUNE)
        return TaskData(
            train=train.prefetch(tf.data.AUTOTUNE),
            validation=images(splits["validation"]).batch(batch_size).prefetch(tf.data.AUTOTUNE),
            test=images(splits["test"]).batch(batch_size).prefetch(tf.data.AUTOTUNE),
            splits=splits,
            skipped=skipped,
        )

    def evaluate(self, model: keras.Model, data: TaskData, output_dir: Path, tensorboard_dir: Path,
                 step: int) -> dict[str, float]:
        """Validation metrics from `model.evaluate`; test reports from an unshuffled `model.predict`.

        Args:
            model: the trained model, fed by `data`.
            data: what `datasets` returned.
            output_dir: the run folder, for the report files.
            tensorboard_dir: where the report images and scalars are logged.
            step: the TensorBoard step (the last epoch).
        """
        validation = model.evaluate(data.validation, return_dict=True, verbose=0)
        test = data.splits["test"]
        probabilities = model.predict(data.test, verbose=0)
        loss = keras.losses.sparse_categorical_crossentropy(test.labels, probabilities)
        return write_classification_reports(
            output_dir,
            class_names=self.dataset.class_names,
            labels=test.labels,
            probabilities=probabilities,
            relative_paths=test.relative_paths,
            image_paths=self.dataset.absolute(test.relative_paths),
            split="test",
            extra_metrics={
                **{f"validation/{name}": float(value) for name, value in validation.items()},
                "test/loss": float(np.mean(keras.ops.convert_to_numpy(loss))),
                "skipped_images": len(data.skipped),
            },
            tensorboard_dir=tensorboard_dir,
            step=step,
        )

    def export_model(self, model: keras.Model) -> keras.Model:
        """The whole classifier on raw images: uint8 RGB of any size -> class probabilities."""
        inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
        return keras.Model(inputs, model(self.resizing(inputs)), name=model.name)


def check_splits(splits: dict[str, Split]) -> None:
    """Every split needs images: say which is empty and what to change."""
    for name, split in splits.items():
        if len(split) == 0:
            raise ValueError(
                f"The {name} split has no images. Add images, or change dataset.validation_percent "
                f"/ dataset.test_percent (a file's split comes from a hash of its path)."
            )
