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

from pipeline.data import apply_orientation, decode_error, decode_image, tf_paths
from pipeline.distribute import local_predictor
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
    looks complete. Each entry also carries its image's hash, its shape and a checksum of its
    features (`encode_entry`), checked before it is used: a damaged, truncated or swapped entry is
    computed again, with a warning naming it.

    Args:
        directory: the cache root, shared between runs.
        extractor: model from float RGB [0, 255] images to feature maps.
        key: JSON-able description of everything that determines the extractor's output.
    """

    def __init__(self, directory: str | Path, extractor: keras.Model, key: dict):
        self.extractor = extractor
        self.key = key
        self._predict = None  # the compiled extractor, built on first use
        key = {**key, "entry_format": ENTRY_MAGIC.decode().strip()}  # older entries have no checksum
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
                entries.append(self.entry(sha256_file(path, max_bytes=MAX_IMAGE_BYTES)))
            except OSError as error:  # a link loop, a vanished or unreadable file, a FIFO, a device
                entries.append(None)
                reasons[path] = error.strerror or str(error)
        shape = tuple(self.extractor.output_shape[1:])
        present = [entry is not None and entry.exists() and self._usable(entry, shape) for entry in entries]
        hits = sum(present)
        # One computation per distinct content, even when two files hold the same bytes.
        missing = sorted({entries[i]: i for i, entry in enumerate(entries)
                          if entry is not None and not present[i]}.values())
        if missing:
            written = self._compute([paths[i] for i in missing], [orientations[i] for i in missing],
                                    [entries[i] for i in missing], batch_size, resizing, augmentation,
                                    description)
            entries = [written.get(entry, entry) for entry in entries]
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

    def _usable(self, entry: Path, shape: tuple[int, ...]) -> bool:
        """Whether a stored entry is whole and belongs to its name; a bad one is removed with a warning."""
        problem = entry_problem(entry, entry.stem, shape)
        if problem is None:
            return True
        log.warning("Cache entry %s is damaged (%s); its features are computed again.", entry, problem)
        entry.unlink(missing_ok=True)
        return False

    def _predictor(self):
        """The extractor's compiled predict function, built once per cache.

        Compiled (a graph on TensorFlow, jit on JAX) because eager calls of the base cost 3x more
        on CPU; any batch size, so the last, smaller batch reuses it after one more trace.
        """
        if self._predict is None:
            self._predict = local_predictor(self.extractor)
        return self._predict

    def _compute(self, paths, orientations, entries, batch_size, resizing, augmentation,
                 description) -> dict[Path, Path]:
        """Computes and stores features; returns {planned entry: entry written} (they differ when a
        file changed after it was hashed: each entry is named after exactly the bytes decoded)."""
        @tf.autograph.experimental.do_not_convert  # AutoGraph would leave module files in /tmp
        def load(index, path, orientation):
            contents = tf.io.read_file(path)
            digest = tf.numpy_function(sha256_bytes, [contents], tf.string, stateful=False)
            image = resizing(tf.cast(apply_orientation(decode_image(contents), orientation), tf.float32))
            return index, digest, tf.cast(image, tf.float32)  # resized in float16 under mixed_float16

        @tf.autograph.experimental.do_not_convert
        def augment(indices, digests, batch):
            return indices, digests, augmentation(batch, training=True)  # Keras layers run in tf.data on any backend

        images = (
            tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), tf_paths(paths), orientations))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()  # unreadable files get no entry; fill() reports them
            .batch(batch_size)
        )
        if augmentation is not None:
            images = images.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        images = images.prefetch(tf.data.AUTOTUNE)
        extract = self._predictor()
        total = math.ceil(len(paths) / batch_size)
        written = {}
        # disable=None: no progress bar when stderr is not a terminal (a log file gets the summary line).
        for indices, digests, batch in tqdm(images, total=total, desc=description, unit="batch", disable=None):
            features = extract(batch).astype(np.float32, copy=False)  # float16 under mixed_float16
            for index, digest, feature in zip(indices.numpy(), digests.numpy(), features):
                entry = self.entry(digest.decode())
                atomic_write_bytes(entry, encode_entry(digest.decode(), feature))
                written[entries[index]] = entry
            del features, batch  # freed before the trim, not when the next batch replaces them
            _return_freed_memory()
        return written


# A cache entry: this magic, a JSON header padded to ENTRY_HEADER_BYTES (the image's sha256, dtype,
# shape and the payload's sha256), then the float32 features, little-endian. Every entry can so be
# checked against its name and its content before it is used.
ENTRY_MAGIC = b"KHP-FEATURES-1\n"
ENTRY_HEADER_BYTES = 256
MAX_IMAGE_BYTES = 1 << 30  # larger "images" (a sparse file, a stream) are not read


def sha256_bytes(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


def encode_entry(image_hash: str, features: np.ndarray) -> bytes:
    """The bytes of a cache entry: header (name, shape, checksum) and float32 payload."""
    payload = np.ascontiguousarray(features, dtype="<f4").tobytes()
    header = json.dumps({"image_sha256": image_hash, "dtype": "float32", "shape": list(features.shape),
                         "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode()
    return ENTRY_MAGIC + header.ljust(ENTRY_HEADER_BYTES - len(ENTRY_MAGIC)) + payload


def entry_problem(entry: Path, image_hash: str, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a stored entry (truncated, flipped bytes, another image's, another shape), or None.

    Args:
        entry: the entry file.
        image_hash: the sha256 of the image it must belong to (its file name).
        shape: the feature shape the extractor gives.
    """
    size = ENTRY_HEADER_BYTES + 4 * math.prod(shape)
    try:
        with open(entry, "rb") as file:
            data = file.read(size + 1)
    except OSError as error:
        return error.strerror or str(error)
    if not data.startswith(ENTRY_MAGIC):
        return "not a feature entry of this version"
    try:
        header = json.loads(data[len(ENTRY_MAGIC):ENTRY_HEADER_BYTES])
    except ValueError:
        return "unreadable header"
    if header.get("image_sha256") != image_hash:
        return "it holds the features of another image"
    if header.get("dtype") != "float32" or tuple(header.get("shape", ())) != tuple(shape):
        return f"shape {header.get('shape')}, expected {list(shape)}"
    if len(data) != size:
        return f"{len(data)} bytes, expected {size}"
    if hashlib.sha256(data[ENTRY_HEADER_BYTES:]).hexdigest() != header.get("payload_sha256"):
        return "checksum mismatch"
    return None


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
        contents = tf.strings.substr(tf.io.read_file(path), ENTRY_HEADER_BYTES, 4 * math.prod(feature_shape))
        features = tf.reshape(tf.io.decode_raw(contents, tf.float32, little_endian=True), feature_shape)
        return features, label

    return tf.data.Dataset.from_tensor_slices(([os.fsencode(e) for e in entries], labels)).map(
        read, num_parallel_calls=tf.data.AUTOTUNE
    )
