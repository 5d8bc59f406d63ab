"""Content-addressed bottleneck cache: the frozen base runs once per distinct image, ever."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from pipeline.data import decode_error, read_image, tf_paths
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
        self._extract = {}  # augmentation (or None) -> compiled extractor
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
        orientations: list[int],
        batch_size: int,
        resizing: keras.layers.Layer,
        augmentation: keras.layers.Layer | None = None,
        description: str = "Caching features",
    ) -> CacheFill:
        """Computes and stores the features of every image not cached yet.

        Streams: one batch of images and features is in memory at a time. Images that cannot be
        read get no entry and are returned in `bad` with the reason.

        Args:
            paths: image files.
            orientations: each file's EXIF orientation, applied after decoding.
            batch_size: images per extractor call.
            resizing: the resize layer to the extractor's input size (the exported model reuses it).
            augmentation: applied to each batch before the extractor, for cached augmented views.
            description: progress bar label.
        """
        entries, reasons = [], {}
        for path in paths:
            try:
                entries.append(self.entry(sha256_file(path)))
            except OSError as error:  # a link loop, a vanished or unreadable file
                entries.append(None)
                reasons[path] = error.strerror or str(error)
        present = [entry is not None and entry.exists() for entry in entries]
        hits = sum(present)
        # One computation per distinct content, even when two files hold the same bytes.
        missing = sorted({entries[i]: i for i, entry in enumerate(entries)
                          if entry is not None and not present[i]}.values())
        if missing:
            self._compute([paths[i] for i in missing], [orientations[i] for i in missing],
                          [entries[i] for i in missing], batch_size, resizing, augmentation,
                          description)
        for path, entry in zip(paths, entries):
            if entry is not None and not entry.exists():
                reasons[path] = decode_error(path) or "could not be decoded"
        bad = [(path, reasons[path]) for path in paths if path in reasons]
        log.info("%s: %d cache hits, %d misses, %d unreadable", description, hits,
                 len(paths) - hits, len(bad))
        return CacheFill(
            entries=[None if path in reasons else entry for path, entry in zip(paths, entries)],
            bad=bad, hits=hits, misses=len(paths) - hits,
        )

    def _extract_function(self, augmentation: keras.layers.Layer | None):
        """The extractor (after `augmentation`) as a graph, traced once per cache and augmentation.

        A graph because eager calls of the base cost 3x more on CPU; any batch size, so the last,
        smaller batch and every split reuse the one trace.
        """
        if augmentation not in self._extract:
            spec = tf.TensorSpec((None, *self.extractor.input_shape[1:]), tf.float32)

            @tf.function(input_signature=[spec], autograph=False)  # no tensor-dependent Python control flow
            def extract(batch):
                if augmentation is not None:
                    batch = augmentation(batch, training=True)
                return tf.cast(self.extractor(batch, training=False), tf.float32)

            self._extract[augmentation] = extract
        return self._extract[augmentation]

    def _compute(self, paths, orientations, entries, batch_size, resizing, augmentation, description):
        @tf.autograph.experimental.do_not_convert  # AutoGraph would leave module files in /tmp
        def load(index, path, orientation):
            return index, resizing(tf.cast(read_image(path, orientation), tf.float32))

        images = (
            tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), tf_paths(paths), orientations))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()  # unreadable files get no entry; fill() reports them
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
        extract = self._extract_function(augmentation)
        total = math.ceil(len(paths) / batch_size)
        for indices, batch in tqdm(images, total=total, desc=description, unit="batch"):
            features = extract(tf.cast(batch, tf.float32)).numpy()  # resized in float16 under mixed_float16
            for index, feature in zip(indices.numpy(), features):
                atomic_write_bytes(entries[index], tf.io.serialize_tensor(feature).numpy())
            del features, batch  # freed before the trim, not when the next batch replaces them
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Gives the memory of freed batches back to the system (glibc only; elsewhere a no-op).

    glibc's malloc keeps freed blocks in its arenas for reuse, so without this the resident memory
    of a caching run creeps up over its first batches (bench/cache_memory.py: 2.15x from 40 to 400
    images, against 1.2x with it) although only one batch is alive at a time.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")  # runs ldconfig: once per process
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def feature_dataset(entries: list[Path], labels: np.ndarray, feature_shape: tuple[int, ...]) -> tf.data.Dataset:
    """(features, label) pairs read from cache entries in order, decoded in parallel."""

    @tf.autograph.experimental.do_not_convert
    def read(path, label):
        features = tf.io.parse_tensor(tf.io.read_file(path), out_type=tf.float32)
        return tf.ensure_shape(features, feature_shape), label

    return tf.data.Dataset.from_tensor_slices(([os.fsencode(e) for e in entries], labels)).map(
        read, num_parallel_calls=tf.data.AUTOTUNE
    )
