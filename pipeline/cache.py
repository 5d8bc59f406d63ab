"""Content-addressed bottleneck cache: the frozen base runs once per distinct image, ever."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from pipeline.data import decode_error, decode_image
from pipeline.files import atomic_write_bytes, atomic_write_text, sha256_file

log = logging.getLogger(__name__)


@dataclass
class CacheFill:
    """What `FeatureCache.fill` found: an entry per image (None where unreadable) and counts."""

    entries: list[Path | None]
    bad: list[tuple[str, str]]
    hits: int
    misses: int


class FeatureCache:
    """Feature maps on disk, one file per (feature extractor, image bytes).

    The folder name hashes everything that changes a feature: backbone, a fingerprint of its
    weights, feature layer, preprocessing, image size and resize method, and the augmentation view.
    The file name is the sha256 of the image's bytes. So an edited image, new weights or another
    size can never reuse a stale vector, and adding images computes only the new ones. Each entry is
    written to a temporary file and renamed into place: a killed run never leaves an entry that
    looks complete.

    Args:
        directory: the cache root, shared between runs.
        extractor: model from float RGB [0, 255] images to feature maps.
        key: JSON-able description of everything that determines the extractor's output.
    """

    def __init__(self, directory: str | Path, extractor: keras.Model, key: dict):
        self.extractor = extractor
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.directory = Path(directory) / digest[:32]
        manifest = self.directory / "key.json"
        if not manifest.exists():
            atomic_write_text(manifest, json.dumps(key, indent=2, sort_keys=True))

    def entry(self, content_hash: str) -> Path:
        return self.directory / content_hash[:2] / f"{content_hash}.tensor"

    def fill(
        self,
        paths: list[str],
        image_size: tuple[int, int],
        batch_size: int,
        resizing: keras.layers.Layer,
        augmentation: keras.layers.Layer | None = None,
        description: str = "Caching features",
    ) -> CacheFill:
        """Computes and stores the features of every image not cached yet.

        Streams: one batch of images and features is in memory at a time. Images the decoder cannot
        read get no entry and are returned in `bad` with the reason.

        Args:
            paths: image files.
            image_size: `[height, width]` fed to the extractor.
            batch_size: images per extractor call.
            resizing: the resize layer (the exported model reuses it).
            augmentation: applied to each batch before the extractor, for cached augmented views.
            description: progress bar label.
        """
        entries = [self.entry(sha256_file(path)) for path in paths]
        present = [entry.exists() for entry in entries]
        hits = sum(present)
        # One computation per distinct content, even when two files hold the same bytes.
        missing = sorted({entries[i]: i for i in range(len(paths)) if not present[i]}.values())
        if missing:
            self._compute([paths[i] for i in missing], [entries[i] for i in missing], image_size,
                          batch_size, resizing, augmentation, description)
        bad = [(path, decode_error(path) or "could not be decoded")
               for path, entry in zip(paths, entries) if not entry.exists()]
        log.info("%s: %d cache hits, %d misses, %d unreadable", description, hits,
                 len(paths) - hits, len(bad))
        unreadable = {path for path, _ in bad}
        return CacheFill(
            entries=[None if path in unreadable else entry for path, entry in zip(paths, entries)],
            bad=bad, hits=hits, misses=len(paths) - hits,
        )

    def _compute(self, paths, entries, image_size, batch_size, resizing, augmentation, description):
        def load(index, path):
            image = tf.cast(decode_image(tf.io.read_file(path)), tf.float32)
            return index, resizing(image)

        images = (
            tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), paths))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()  # unreadable files get no entry; fill() reports them
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
        total = math.ceil(len(paths) / batch_size)
        for indices, batch in tqdm(images, total=total, desc=description, unit="batch"):
            if augmentation is not None:
                batch = augmentation(batch, training=True)
            features = keras.ops.convert_to_numpy(self.extractor(batch, training=False))
            for index, feature in zip(indices.numpy(), features):
                atomic_write_bytes(entries[index], tf.io.serialize_tensor(feature).numpy())


def feature_dataset(entries: list[Path], labels: np.ndarray, feature_shape: tuple[int, ...]) -> tf.data.Dataset:
    """(features, label) pairs read from cache entries in order, decoded in parallel."""

    def read(path, label):
        features = tf.io.parse_tensor(tf.io.read_file(path), out_type=tf.float32)
        return tf.ensure_shape(features, feature_shape), label

    return tf.data.Dataset.from_tensor_slices(([str(e) for e in entries], labels)).map(
        read, num_parallel_calls=tf.data.AUTOTUNE
    )
