"""FCN-32s semantic segmentation (Long, Shelhamer & Darrell) on any backbone's stride-32 features."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones import Backbone, unfreeze_top
from pipeline.checks import dataset_mismatch, image_size_pair
from pipeline.data import tf_paths
from pipeline.distribute import even_batches, local_predictor, saving_is_collective
from pipeline.files import atomic_write_text
from pipeline.layers import uint8_to_float32
from pipeline.segmentation import (IGNORE_LABEL, JointAugmentation, SegmentationData, SegmentationSplit,
                                   fit_pair, load_pair, pair_dataset)
from pipeline.segmentation_metrics import PixelAccuracy, confusion_histogram
from pipeline.segmentation_reports import write_segmentation_reports
from pipeline.models import classifier_kernel, fcn32s
from pipeline.tasks.classification import TaskData

log = logging.getLogger(__name__)

LAYER_KEYS = {"name", "filters", "kernel_size", "dropout_rate", "initialize_from"}


class FCN32Task:
    """FCN-32s: backbone to stride 32, optional convolutionalised classifier, 1x1 class scores, x32 bilinear.

    The model takes float RGB images of any size: it pads them at the bottom and right to a multiple
    of 32, and crops the upsampled scores back to the input size (see `pipeline.layers.PadToMultiple`
    and docs/segmentation.md for why that aligns output and input). Softmax and loss are float32.

    Args:
        backbone: the base, cut at its stride-32 `feature_layer`.
        dataset: a `SegmentationData` (VOC, COCO, the VOC demo).
        image_size: `[height, width]` of training batches (ignored with `original_size`).
        classifier_layers: convolutions between the base and the class scores, each a dict with
            `name`, `filters`, `kernel_size`, `dropout_rate` (default 0.5) and optionally
            `initialize_from`: the layer of the backbone's ImageNet classifier whose weights it takes
            (a Dense kernel is reshaped into the convolution: VGG16's fc1 -> 7x7 fc6).
        upsampling: "per_class" (one bilinear kernel per class, k*k*C weights), "dense" (the
            reference's class-diagonal Conv2DTranspose, k*k*C*C weights), or "auto" (dense while
            its kernel fits in 16 MiB, i.e. up to 32 classes; faster to train on CPU); same output.
        trainable_upsampling: learn the upsampling kernel (the reference keeps it fixed).
        trainable_layers: layers of the base to train from the top: 0 frozen, -1 all.
        score_initializer: initializer of the 1x1 class-score convolution (the reference: zeros).
        original_size: train on each image at its own size, one per batch (the reference recipe);
            otherwise images are scaled to fit `image_size`, augmented and cropped to it.
        augmentation: joint image-and-mask augmentation, or None.
        overlay_images: test images drawn in `predictions.png`.
        seed: shuffling and augmentation seed.
    """

    fine_tune_epochs = 0  # one training phase

    def __init__(
        self,
        backbone: Backbone,
        dataset: SegmentationData,
        image_size: list[int],
        classifier_layers: list[dict] | None = None,
        upsampling: str = "auto",
        trainable_upsampling: bool = False,
        trainable_layers: int = 0,
        score_initializer: str = "zeros",
        original_size: bool = False,
        augmentation: JointAugmentation | None = None,
        overlay_images: int = 6,
        seed: int = 0,
    ):
        if upsampling not in ("auto", "per_class", "dense"):
            raise ValueError(f"task.upsampling must be 'auto', 'per_class' or 'dense'; got {upsampling!r}.")
        if not isinstance(dataset, SegmentationData):  # before any model is built; also from the config, earlier
            raise dataset_mismatch("fcn32", "segmentation", type(dataset).__name__)
        self.backbone = backbone
        self.dataset = dataset
        self.image_size = tuple(image_size_pair(image_size))
        self.classifier_layers = [self._check_layer(spec) for spec in classifier_layers or []]
        self.upsampling = upsampling
        self.trainable_upsampling = trainable_upsampling
        self.trainable_layers = trainable_layers
        self.score_initializer = score_initializer
        self.original_size = original_size
        self.augmentation = augmentation
        self.overlay_images = overlay_images
        self.seed = seed

    @staticmethod
    def _check_layer(spec: dict) -> dict:
        unknown = set(spec) - LAYER_KEYS
        if unknown or not {"name", "filters", "kernel_size"} <= set(spec):
            raise ValueError(f"Each of task.classifier_layers needs name, filters and kernel_size, and may "
                             f"have dropout_rate and initialize_from; got {dict(spec)}.")
        return {"dropout_rate": 0.5, "initialize_from": None, **spec}

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def loss(self) -> keras.losses.Loss:
        # Mean over the pixels that have a class label: 255 adds neither loss nor count.
        return keras.losses.SparseCategoricalCrossentropy(ignore_class=IGNORE_LABEL)

    def metrics(self) -> list:
        return [PixelAccuracy(IGNORE_LABEL),
                keras.metrics.MeanIoU(self.num_classes, name="mean_iu", ignore_class=IGNORE_LABEL,
                                      sparse_y_pred=False)]

    def build_model(self) -> keras.Model:
        """Float RGB `[batch, height, width, 3]` of any size -> class probabilities of the same size."""
        base = self.backbone.build([None, None])  # fully convolutional: any size
        if self.trainable_layers:
            unfreeze_top(base, self.trainable_layers)
        model = fcn32s(base, self.num_classes, self.backbone.preprocessing, self.classifier_layers,
                       self.upsampling, self.trainable_upsampling, self.score_initializer,
                       frozen_statistics=self.backbone.weights is not None,
                       name=f"{self.backbone.name}_fcn32s")
        self._initialize_from_classifier(model)
        return model

    def _initialize_from_classifier(self, model: keras.Model) -> None:
        """Copies the backbone's ImageNet classifier into the `initialize_from` convolutions."""
        wanted = [spec for spec in self.classifier_layers if spec["initialize_from"]]
        if not wanted or self.backbone.weights is None:
            return
        try:
            classifier = self.backbone.build(include_top=True)
        except ValueError as error:  # a weights file without the classifier
            log.warning("%s: random initialisation, the weights have no classifier (%s).",
                        ", ".join(spec["name"] for spec in wanted), error)
            return
        for spec in wanted:
            try:
                source = classifier.get_layer(spec["initialize_from"])
            except ValueError as error:
                raise ValueError(f"task.classifier_layers: {spec['name']} initialize_from="
                                 f"{spec['initialize_from']!r} is not a layer of {self.backbone.name}'s "
                                 "classifier.") from error
            kernel, bias = source.get_weights()[:2]
            target = model.get_layer(spec["name"])
            target.set_weights([classifier_kernel(kernel, target.kernel.shape, spec["name"]), bias])
            log.info("%s initialised from %s's %s.", spec["name"], self.backbone.name, spec["initialize_from"])
        del classifier

    def datasets(self, batch_size: int) -> TaskData:
        """Training, validation and test data; masks checked first (a bad value stops the run).

        Training batches are fit to `image_size` and augmented (or, with `original_size`, one image
        at its own size); validation and test are at the original size, batch 1, in split order.

        Args:
            batch_size: the global batch size.
        """
        if saving_is_collective():  # model.evaluate below would wait for processes that do not evaluate
            raise ValueError("task=fcn32 runs on one JAX process (its evaluation runs on process 0 alone); "
                             "use strategy=data_parallel over this machine's devices, without JAX_NUM_PROCESSES.")
        if self.original_size and batch_size != 1:
            raise ValueError(f"task.original_size=true trains each image at its own size, so batches hold one "
                             f"image; got batch_size={batch_size}. Set batch_size=1 (the reference recipe) or "
                             "task.original_size=false to train on image_size crops.")
        splits, skipped = self.dataset.readable_splits()
        size = None if self.original_size else self.image_size
        train_split = splits["train"]
        examples = tf.data.Dataset.from_tensor_slices(
            (tf_paths(train_split.image_paths), tf_paths(train_split.mask_paths), tf.range(len(train_split))))

        @tf.autograph.experimental.do_not_convert  # AutoGraph would leave module files in /tmp
        def one_epoch(epoch):
            epoch_seed = tf.cast(self.seed, tf.int64) * 1_000_003 + epoch

            @tf.autograph.experimental.do_not_convert
            def load(image_path, mask_path, index):
                # A stateless seed per (epoch, example): the same augmentation on a resumed run.
                seed = tf.stack([epoch_seed, tf.cast(index, tf.int64)])
                image, mask = load_pair(image_path, mask_path, self.num_classes)
                return as_labels(*fit_pair(image, mask, seed, size, self.augmentation))

            shuffled = examples.shuffle(len(train_split), seed=epoch_seed)
            return shuffled.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

        def train(first_epoch: int, end_epoch: int) -> tf.data.Dataset:
            return tf.data.Dataset.range(first_epoch, end_epoch).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)

        def evaluation(split: SegmentationSplit) -> tf.data.Dataset:
            pairs = pair_dataset(split, self.num_classes).map(as_labels, num_parallel_calls=tf.data.AUTOTUNE)
            return pairs.batch(1).prefetch(tf.data.AUTOTUNE)

        return TaskData(
            train=train,
            steps_per_epoch=math.ceil(len(train_split) / batch_size),
            validation=evaluation(splits["validation"]),
            test=evaluation(splits["test"]),
            splits=splits,
            skipped=skipped,
        )

    def evaluate(self, model: keras.Model, data: TaskData, output_dir: Path, tensorboard_dir: Path,
                 step: int) -> dict[str, float]:
        """Validation from `model.evaluate`; test scored at the original resolution, with reports.

        Args:
            model: the trained model.
            data: what `datasets` returned.
            output_dir: the run folder.
            tensorboard_dir: where report images and scalars are logged.
            step: the TensorBoard step.
        """
        validation = model.evaluate(even_batches(data.validation), return_dict=True, verbose=0)
        predict = local_predictor(model)
        test = data.splits["test"]
        hist = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        loss_sum, loss_pixels, examples = 0.0, 0, []
        for index, (image, mask) in enumerate(data.test):
            probabilities = predict(image)[0]
            labels = mask.numpy()[0]
            predicted = np.argmax(probabilities, axis=-1)
            hist += confusion_histogram(labels, predicted, self.num_classes)
            loss_sum, loss_pixels = _add_loss(loss_sum, loss_pixels, probabilities, labels, self.num_classes)
            if index < self.overlay_images:
                examples.append((test.names[index], image.numpy()[0].round().astype(np.uint8), labels, predicted))
        atomic_write_text(Path(output_dir) / "classes.json",
                          json.dumps(self.dataset.class_table(), indent=1) + "\n")
        return write_segmentation_reports(
            output_dir,
            class_names=self.dataset.class_names,
            hist=hist,
            examples=examples,
            split="test",
            extra_metrics={
                **{f"validation/{name}": float(value) for name, value in validation.items()},
                "test/loss": loss_sum / max(loss_pixels, 1),
                "test/images": len(test),
                "skipped_images": len(data.skipped),
            },
            tensorboard_dir=tensorboard_dir,
            step=step,
        )

    def export_model(self, model: keras.Model) -> keras.Model:
        """uint8 RGB of any size -> per-pixel class probabilities at that size, in inference mode."""
        inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
        return keras.Model(inputs, model(uint8_to_float32(inputs), training=False), name=model.name)


@tf.autograph.experimental.do_not_convert
def as_labels(image: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(float32 image, int32 labels): the loss and metrics take int labels, 255 = ignore."""
    return image, tf.cast(mask, tf.int32)


def _add_loss(loss_sum: float, pixels: int, probabilities: np.ndarray, labels: np.ndarray,
              num_classes: int) -> tuple[float, int]:
    """Adds the cross-entropy of one image's labelled pixels (Keras's clipping at 1e-7)."""
    valid = labels < num_classes
    chosen = probabilities[valid, labels[valid]]
    return loss_sum + float(-np.log(np.clip(chosen, 1e-7, 1.0)).sum()), pixels + int(valid.sum())
