"""Image classification trained end to end: backbone + head on images, augmented in tf.data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones import Backbone, unfreeze_top
from pipeline.checks import dataset_mismatch, image_size_pair
from pipeline.data import ImageFolder, Split, find_bad_images, handle_bad_images, read_image, tf_paths
from pipeline.distribute import local_predictor
from pipeline.layers import ImagePreprocessing, uint8_to_float32
from pipeline.models import classification_head
from pipeline.reports import top_k_accuracy, write_classification_reports


@dataclass
class TaskData:
    """The datasets `model.fit` and evaluation read, and the examples behind them.

    Args:
        train: `train(first_epoch, end_epoch)` gives the (input, label) batches of those epochs,
            each epoch shuffled by a seed derived from its number, so a run resumed at epoch k sees
            exactly the batches an uninterrupted run sees from epoch k on.
        steps_per_epoch: batches per training epoch.
        validation: unshuffled batches in `splits["validation"]` order.
        test: unshuffled batches in `splits["test"]` order; None when the dataset has no test split
            (`dataset.test_percent=0`: the reports are then on the validation split).
        splits: the readable examples of each split, in dataset order (`Split`, or
            `pipeline.segmentation.SegmentationSplit` for segmentation).
        skipped: (path, reason) of every unreadable image left out.
    """

    train: Callable[[int, int], tf.data.Dataset]
    steps_per_epoch: int
    validation: tf.data.Dataset
    test: tf.data.Dataset | None
    splits: dict
    skipped: list[tuple[str, str]]


def epochs_of(examples: tf.data.Dataset, count: int, batch_size: int, seed: int,
              load: Callable | None = None, augment: Callable | None = None,
              ) -> tuple[Callable[[int, int], tf.data.Dataset], int]:
    """`train(first, end)` over `examples`, reshuffled per epoch by `seed` and the epoch number.

    Args:
        examples: one epoch of unbatched training examples, in a fixed order.
        count: how many there are.
        batch_size: the global batch size.
        seed: the run's seed.
        load: applied to each example after the shuffle (decoding), in parallel.
        augment: applied to each batch.
    """

    @tf.autograph.experimental.do_not_convert  # plain graph code: AutoGraph would write a module file per function to /tmp
    def one_epoch(epoch):
        shuffled = examples.shuffle(count, seed=seed * 1_000_003 + epoch)
        if load is not None:
            shuffled = shuffled.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        batches = shuffled.batch(batch_size)
        return batches.map(augment, num_parallel_calls=tf.data.AUTOTUNE) if augment else batches

    def train(first_epoch: int, end_epoch: int) -> tf.data.Dataset:
        epochs = tf.data.Dataset.range(first_epoch, end_epoch)
        return epochs.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)

    return train, math.ceil(count / batch_size)


class ClassificationTask:
    """Backbone and head trained together on images.

    Args:
        backbone: the pretrained (or randomly initialised) base.
        dataset: the folder-per-class images.
        image_size: `[height, width]` the model sees (one int: a square).
        dropout_rate: dropout before the classifier.
        pooling: "avg" or "max" over the stride-32 feature map.
        trainable_layers: layers of the base to train, counted from the top: 0 keeps it frozen,
            -1 trains all of it (use -1 with `backbone.weights=null` to train from scratch).
        augmentation: Keras preprocessing layers applied to training batches in tf.data.
        seed: shuffling seed.
    """

    task_name = "classification"  # the option of conf/task/, for messages
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
        if not isinstance(dataset, ImageFolder):  # also checked from the config, before TensorFlow loads
            raise dataset_mismatch(self.task_name, "folder", type(dataset).__name__)
        self.backbone = backbone
        self.dataset = dataset
        self.image_size = tuple(image_size_pair(image_size))
        self.dropout_rate = dropout_rate
        self.pooling = pooling
        self.trainable_layers = trainable_layers
        # A Pipeline, not Sequential: it runs its layers in tf.data under any backend (JAX included).
        self.augmentation = keras.layers.Pipeline(augmentation, name="augmentation") if augmentation else None
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
        return classification_head(feature_shape, self.num_classes, self.dropout_rate, self.pooling)

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
        """Image datasets: decode, resize, batch, prefetch; shuffled and augmented for training.

        The training split is shuffled as file names, before decoding, so the shuffle buffer holds
        paths, not images.
        """
        splits, skipped = self.readable_splits()
        check_splits(splits, without_test=self.dataset.test_percent == 0)

        def files(split: Split) -> tf.data.Dataset:
            paths = split.relative_paths
            return tf.data.Dataset.from_tensor_slices(
                (tf_paths(self.dataset.absolute(paths)), self.dataset.orientations(paths), split.labels))

        @tf.autograph.experimental.do_not_convert
        def load(path, orientation, label):
            return self.resizing(tf.cast(read_image(path, orientation), tf.float32)), label

        def unshuffled(split: Split) -> tf.data.Dataset:
            batches = files(split).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
            return batches.prefetch(tf.data.AUTOTUNE)

        @tf.autograph.experimental.do_not_convert
        def augment(images, labels):
            return self.augmentation(images, training=True), labels

        train, steps = epochs_of(files(splits["train"]), len(splits["train"]), batch_size, self.seed,
                                 load=load, augment=augment if self.augmentation is not None else None)
        return TaskData(train=train, steps_per_epoch=steps, validation=unshuffled(splits["validation"]),
                        test=unshuffled(splits["test"]) if len(splits["test"]) else None, splits=splits,
                        skipped=skipped)

    def evaluate(self, model: keras.Model, data: TaskData, output_dir: Path, tensorboard_dir: Path,
                 step: int) -> dict[str, float]:
        """Predicts validation and test in order and writes the reports of the test split (of the
        validation split when there is no test split).

        Predictions are a loop over the batches on this process, so under a multi-worker strategy
        the chief evaluates alone and the order always matches the labels.

        Args:
            model: the trained model, fed by `data`.
            data: what `datasets` returned.
            output_dir: the run folder, for the report files.
            tensorboard_dir: where the report images and scalars are logged.
            step: the TensorBoard step (the last epoch).
        """
        metrics = {}
        # Compiled, not `model.predict`: under a multi-worker strategy the chief predicts alone, and
        # `predict` would wait for the other workers. Eager calls would cost 3x more.
        predict = local_predictor(model)
        reported = "test" if data.test is not None else "validation"
        for name in ("validation", "test"):
            if getattr(data, name) is None:
                continue
            labels = data.splits[name].labels
            probabilities = np.concatenate([predict(inputs) for inputs, _ in getattr(data, name)])
            loss = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(labels, probabilities))
            k = min(5, self.num_classes)
            metrics[name] = {f"{name}/loss": float(np.mean(loss)),
                             f"{name}/accuracy": float(np.mean(np.argmax(probabilities, axis=1) == labels)),
                             f"{name}/top_{k}_accuracy": top_k_accuracy(labels, probabilities, k)}
        split = data.splits[reported]
        # Copies of another file's bytes in another class or split (ImageFolder finds them).
        duplicates = sum(len(group) - 1 for group in getattr(self.dataset, "duplicates", []))
        return write_classification_reports(
            output_dir,
            class_names=self.dataset.class_names,
            labels=split.labels,
            probabilities=probabilities,
            relative_paths=split.relative_paths,
            image_paths=self.dataset.absolute(split.relative_paths),
            split=reported,
            extra_metrics={**metrics["validation"], f"{reported}/loss": metrics[reported][f"{reported}/loss"],
                           "skipped_images": len(data.skipped), "duplicate_images": duplicates},
            tensorboard_dir=tensorboard_dir,
            step=step,
        )

    def export_model(self, model: keras.Model) -> keras.Model:
        """The whole classifier on raw images: uint8 RGB of any size -> class probabilities.

        Every call inside is made with `training=False`, so inference mode is part of the graph:
        `Resizing` defaults to `training=True`, which otherwise switched the head's Dropout on in a
        plain `model(x)` (and in SavedModel / ONNX exports traced from it).
        """
        inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
        images = self.resizing(uint8_to_float32(inputs), training=False)
        return keras.Model(inputs, model(images, training=False), name=model.name)


def check_splits(splits: dict[str, Split], without_test: bool = False) -> None:
    """Every split needs images (the test split not when `without_test`): say which is empty and why.

    Args:
        splits: the readable examples of each split.
        without_test: the dataset asked for no test split (`dataset.test_percent=0`).
    """
    for name, split in splits.items():
        if len(split) == 0 and not (name == "test" and without_test):
            raise ValueError(
                f"The {name} split has no images. Add images, or change dataset.validation_percent "
                f"/ dataset.test_percent (a file's split comes from a hash of its path)."
            )
