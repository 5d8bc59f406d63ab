"""Transfer learning on cached bottleneck features: the frozen base runs once per image, not per epoch."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones import unfreeze_top, weights_fingerprint
from pipeline.cache import FeatureCache, feature_dataset
from pipeline.data import Split, handle_bad_images
from pipeline.layers import uint8_to_float32
from pipeline.tasks.classification import ClassificationTask, TaskData, check_splits, epochs_of

log = logging.getLogger(__name__)


class TransferTask(ClassificationTask):
    """A new head on a frozen pretrained base, trained on features cached on disk.

    The first run computes each image's feature map once and stores it (`pipeline.cache`); every
    epoch, and every later run with the same backbone, weights, size and images, reads the stored
    features, so training costs only the head. With `augmented_views: K` and an `augmentation`,
    K augmented views of each training image are cached beside the original and all of them are
    training examples; validation and test always use the plain images. An optional fine-tuning
    phase then unfreezes the top of the base and trains on images at a lower learning rate.

    Args:
        cache_dir: where features are stored; shared between runs.
        augmented_views: augmented copies of each training image to cache (0: none).
        cache_in_memory: keep the features in memory after the first epoch (`tf.data` cache).
        fine_tune_layers: layers of the base to unfreeze for fine-tuning (-1: all).
        fine_tune_epochs: epochs of fine-tuning after the head is trained (0: no fine-tuning).
        fine_tune_learning_rate: learning rate of the fine-tuning phase.
        **kwargs: the arguments of `ClassificationTask`.
    """

    def __init__(
        self,
        cache_dir: str,
        augmented_views: int = 0,
        cache_in_memory: bool = True,
        fine_tune_layers: int = 0,
        fine_tune_epochs: int = 0,
        fine_tune_learning_rate: float = 1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cache_dir = cache_dir
        self.augmented_views = augmented_views
        self.cache_in_memory = cache_in_memory
        self.fine_tune_layers = fine_tune_layers
        self.fine_tune_epochs = fine_tune_epochs
        self.fine_tune_learning_rate = fine_tune_learning_rate
        if self.augmentation is not None and not augmented_views:
            log.warning("The transfer task ignores task.augmentation unless task.augmented_views > 0.")
        if augmented_views and self.augmentation is None:
            raise ValueError("task.augmented_views > 0 needs task.augmentation: a list of layers.")
        self.extractor = None

    def build_model(self) -> keras.Model:
        """The head alone: it trains on feature maps. The extractor is built beside it."""
        self.extractor = self.backbone.feature_extractor(self.image_size)
        return self.head(self.extractor.output_shape[1:])

    def _cache(self, view: dict | None = None) -> FeatureCache:
        key = {
            "backbone": self.backbone.name,
            "weights": weights_fingerprint(self.extractor),
            "feature_layer": self.backbone.feature_layer,
            "preprocessing": self.backbone.preprocessing,
            "image_size": list(self.image_size),
            "resize": self.resizing.get_config()["interpolation"],
            "dtype_policy": keras.mixed_precision.global_policy().name,
            "view": view,
        }
        return FeatureCache(self.cache_dir, self.extractor, key)

    def datasets(self, batch_size: int) -> TaskData:
        """Caches every image's features (computing only the missing ones), then reads them."""
        cache = self._cache()
        feature_shape = tuple(self.extractor.output_shape[1:])
        splits, entries, skipped = {}, {}, []
        for name, split in self.dataset.splits.items():
            paths = self.dataset.absolute(split.relative_paths)
            fill = cache.fill(paths, self.dataset.orientations(split.relative_paths), batch_size,
                              self.resizing, description=f"Caching {name} features")
            handle_bad_images(fill.bad, self.dataset.on_bad_image)
            keep = [i for i, entry in enumerate(fill.entries) if entry is not None]
            splits[name] = Split([split.relative_paths[i] for i in keep], split.labels[keep])
            entries[name] = [fill.entries[i] for i in keep]
            skipped += fill.bad
        check_splits(splits)

        train_entries, train_labels = list(entries["train"]), splits["train"].labels
        for view in range(self.augmented_views):
            augmented = self._cache({"augmentation": self._augmentation_config(), "view": view})
            train = splits["train"].relative_paths
            fill = augmented.fill(self.dataset.absolute(train), self.dataset.orientations(train),
                                  batch_size, self.resizing, self.augmentation,
                                  description=f"Caching augmented view {view + 1}/{self.augmented_views}")
            train_entries += fill.entries
            train_labels = np.concatenate([train_labels, splits["train"].labels])

        examples = feature_dataset(train_entries, train_labels, feature_shape)
        if self.cache_in_memory:
            examples = examples.cache()
        train, steps = epochs_of(examples, len(train_entries), batch_size, self.seed)

        def unshuffled(name: str) -> tf.data.Dataset:
            features = feature_dataset(entries[name], splits[name].labels, feature_shape)
            return features.batch(batch_size).prefetch(tf.data.AUTOTUNE)

        return TaskData(train=train, steps_per_epoch=steps, validation=unshuffled("validation"),
                        test=unshuffled("test"), splits=splits, skipped=skipped)

    def _augmentation_config(self) -> str:
        return json.dumps([layer.get_config() for layer in self.augmentation.layers], sort_keys=True,
                          default=str)

    def fine_tune_model(self, head: keras.Model) -> keras.Model:
        """The image classifier with the top `fine_tune_layers` of the base unfrozen."""
        base = self.extractor.get_layer(self.backbone.name)
        unfreeze_top(base, self.fine_tune_layers)
        return self.classifier(base, head)

    def image_datasets(self, batch_size: int) -> TaskData:
        """Image datasets for fine-tuning (the base changes, so cached features no longer apply)."""
        return super().datasets(batch_size)

    def export_model(self, model: keras.Model) -> keras.Model:
        """uint8 RGB of any size -> resize -> preprocessing -> base -> head, in inference mode.

        `training=False` on every call fixes Dropout off inside the graph (see
        `ClassificationTask.export_model`).
        """
        if model.name == "head":
            inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
            images = self.resizing(uint8_to_float32(inputs), training=False)
            outputs = model(self.extractor(images, training=False), training=False)
            return keras.Model(inputs, outputs, name=f"{self.backbone.name}_classifier")
        return super().export_model(model)
