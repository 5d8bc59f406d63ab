"""Folder-per-class image data: scanning, stable hashed splits, and the tf.data decode path."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.files import not_regular_reason, sha256_file
# Which folders are classes and which files images: pipeline.folders, shared with the check before TensorFlow.
from pipeline.folders import IMAGE_EXTENSIONS, check_folder_options, image_extensions, scan_folder  # noqa: F401

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_EXIF_ORIENTATION = 0x0112
MAX_IMAGE_PIXELS = 2 * 89_478_485  # Pillow's DecompressionBombError limit (2x its warning limit)


@dataclass
class Split:
    """The examples of one split, in a fixed order that reports and predictions follow.

    Args:
        relative_paths: each image's path under the data root, with `/` separators.
        labels: class index of each image.
    """

    relative_paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.relative_paths)

    def without(self, bad: set[str]) -> "Split":
        """This split less the images in `bad` (relative paths), order kept."""
        keep = [i for i, path in enumerate(self.relative_paths) if path not in bad]
        return Split([self.relative_paths[i] for i in keep], self.labels[keep])


@dataclass
class ImageFolder:
    """Images in one sub-folder per class, split into train / validation / test by path hash.

    A file's split depends only on its relative path, so adding or removing images never moves the
    others between splits (the method of TensorFlow's retrain.py).

    Args:
        root: folder holding one sub-folder per class.
        validation_percent: share of images for validation, 0..100.
        test_percent: share of images for the test split, 0..100; 0: no test split (the run then
            reports on the validation split).
        extensions: file extensions taken as images, compared case-insensitively.
        on_bad_image: "skip" lists unreadable images in the log and `skipped_files.txt` and trains
            on the rest; "error" stops the run at the first check that finds one.
        on_duplicate: what to do with files of identical bytes in two classes or two splits:
            "warn" logs them and keeps every copy, all in the split of the first (so a test image
            is never also a training image); "drop" keeps only the first copy (by path); "error" stops.
        max_image_pixels: images with more pixels (read from the file's header, before anything is
            decoded) are skipped and listed like unreadable ones: one 20000x20000 PNG of 438 KB
            decodes to 1.2 GB. The default is Pillow's decompression-bomb error limit.
    """

    root: str
    validation_percent: float = 10
    test_percent: float = 10
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    on_bad_image: str = "skip"
    on_duplicate: str = "warn"
    max_image_pixels: int = MAX_IMAGE_PIXELS
    class_names: list[str] = field(init=False)
    skipped: list[tuple[str, str]] = field(init=False, default_factory=list)  # (path, reason) found scanning
    splits: dict[str, Split] = field(init=False)
    duplicates: list[list[str]] = field(init=False)  # groups of identical files across classes or splits
    _orientations: dict[str, int] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        self.root = str(Path(self.root).expanduser().resolve())
        check_folder_options(self.validation_percent, self.test_percent, self.on_bad_image, self.on_duplicate)
        self.extensions = image_extensions(self.extensions)
        self.class_names, files = scan_folder(self.root, self.extensions)  # pipeline.folders: the early check's rules
        files = self._without_unsafe(files)  # first: hashing a FIFO would block
        files, first_copy = self._handle_duplicates(files)
        by_split = {name: ([], []) for name in SPLITS}
        for label, relative_path in files:
            paths, labels = by_split[self.split_of(first_copy.get(relative_path, relative_path))]
            paths.append(relative_path)
            labels.append(label)
        self.splits = {
            name: Split(paths, np.asarray(labels, dtype=np.int32))
            for name, (paths, labels) in by_split.items()
        }
        counts = ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
        log.info("%s: %d classes; %s images", self.root, len(self.class_names), counts)
        check_training_classes(self.class_names, self.splits["train"].labels, self.on_bad_image)

    def _handle_duplicates(self, files: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], dict[str, str]]:
        """Finds identical files across classes or splits; returns the files kept and each copy's first copy."""
        label_of = dict((path, label) for label, path in files)
        groups = identical_files(self.root, [path for _, path in files])
        self.duplicates = [group for group in groups
                           if len({label_of[path] for path in group}) > 1
                           or len({self.split_of(path) for path in group}) > 1]
        if not self.duplicates:
            return files, {}
        listing = "\n".join(f"  {' = '.join(group)}" for group in self.duplicates[:20])
        if len(self.duplicates) > 20:
            listing += f"\n  ... and {len(self.duplicates) - 20} more"
        copies = sum(len(group) - 1 for group in self.duplicates)
        what = (f"{copies} file(s) have the same bytes as another file in another class or split "
                f"({len(self.duplicates)} group(s)):\n{listing}\n")
        if self.on_duplicate == "error":
            raise ValueError(what + "Remove the copies, or set dataset.on_duplicate=warn (copies kept in "
                             "one split) or drop (only the first copy kept).")
        if self.on_duplicate == "drop":
            dropped = {path for group in self.duplicates for path in group[1:]}
            log.warning("%sKeeping only the first copy of each (dataset.on_duplicate=drop).", what)
            return [(label, path) for label, path in files if path not in dropped], {}
        log.warning("%sAll copies of an image go to the split of its first copy, so no test image is also a "
                    "training image (dataset.on_duplicate=drop keeps one copy, error stops).", what)
        return files, {path: group[0] for group in self.duplicates for path in group[1:]}

    def _without_unsafe(self, files: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """The files less those no decoder may touch: not regular files, and images over the pixel limit.

        A FIFO would block the run forever, `/dev/zero` would never end, and a huge image would take
        gigabytes before any check; each is skipped, logged and listed in `skipped_files.txt`.
        """
        kept = []
        for label, relative_path in files:
            path = os.path.join(self.root, relative_path)
            reason = not_regular_reason(path)
            if reason is None:
                orientation, reason = inspect_header(path, self.max_image_pixels)
                self._orientations[relative_path] = orientation
            if reason is None:
                kept.append((label, relative_path))
            else:
                self.skipped.append((path, reason))
        handle_bad_images(self.skipped, self.on_bad_image)
        return kept

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_of(self, relative_path: str) -> str:
        """"train", "validation" or "test", from a hash of the path alone."""
        digest = hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).digest()
        bucket = int.from_bytes(digest[:8], "big") / 2**64 * 100
        if bucket < self.test_percent:
            return "test"
        if bucket < self.test_percent + self.validation_percent:
            return "validation"
        return "train"

    def absolute(self, relative_paths: list[str]) -> list[str]:
        return [os.path.join(self.root, path) for path in relative_paths]

    def orientations(self, relative_paths: list[str]) -> list[int]:
        """EXIF orientation of each image, read from its header once and remembered."""
        missing = [path for path in relative_paths if path not in self._orientations]
        for path, absolute in zip(missing, self.absolute(missing)):
            self._orientations[path] = exif_orientation(absolute)
        return [self._orientations[path] for path in relative_paths]


def identical_files(root: str, relative_paths: list[str]) -> list[list[str]]:
    """Groups (of 2 or more, each sorted) of files under `root` with identical bytes.

    Only files of equal size are hashed (sha256), so a folder without duplicates costs a `stat` each.

    Args:
        root: the data root.
        relative_paths: files under it.
    """
    by_size: dict[int, list[str]] = {}
    for path in relative_paths:
        try:
            by_size.setdefault(os.path.getsize(os.path.join(root, path)), []).append(path)
        except OSError:  # a broken link: reported as unreadable later
            continue
    groups: dict[str, list[str]] = {}
    for same_size in by_size.values():
        if len(same_size) > 1:
            for path in same_size:
                try:
                    groups.setdefault(sha256_file(os.path.join(root, path)), []).append(path)
                except OSError:
                    continue
    return sorted(sorted(group) for group in groups.values() if len(group) > 1)


def check_training_classes(class_names: list[str], train_labels: np.ndarray, on_bad_image: str) -> None:
    """Warns (or with `on_bad_image: error`, stops) when a class has no training image.

    Such a class can never be predicted: its examples in validation and test are all mistakes.

    Args:
        class_names: every class, label order.
        train_labels: the training split's labels.
        on_bad_image: "skip" warns, "error" raises.
    """
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts) if count == 0]
    if not empty:
        return
    message = (f"{len(empty)} class(es) have no training images: {', '.join(empty)}. The model can never predict "
               "them. Add images to those class folders, or lower dataset.validation_percent / "
               "dataset.test_percent (a file's split comes from a hash of its path).")
    if on_bad_image == "error":
        raise ValueError(message)
    log.warning(message)


def tf_paths(paths: list[str]) -> list[bytes]:
    """Paths as bytes for TensorFlow, which cannot take file names that are not valid UTF-8."""
    return [os.fsencode(path) for path in paths]


def inspect_header(path: str, max_pixels: int) -> tuple[int, str | None]:
    """(EXIF orientation, why the image must not be decoded or None), from its header alone.

    Args:
        path: a regular file.
        max_pixels: the most pixels an image may have.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read; the limit that counts is max_pixels
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:  # before getexif, which decodes a whole PNG
                return 1, (f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels} "
                           "(dataset.max_image_pixels)")
            Image.MAX_IMAGE_PIXELS = pillow_limit
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # an unreadable file is reported by the decoder, with its reason
        return 1, None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    return (orientation if 1 <= orientation <= 8 else 1), None


def exif_orientation(path: str) -> int:
    """The EXIF orientation tag (1..8) of an image file; 1 when it has none or cannot be read."""
    if not_regular_reason(path) is not None:  # opening a FIFO would block forever
        return 1
    try:
        with warnings.catch_warnings():  # only the header is read: no decompression bomb here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # an unreadable file is reported by the decoder, with its reason
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns decoded pixels upright as the EXIF tag says (TensorFlow's decoders ignore it).

    The eight cases are Pillow's `ImageOps.exif_transpose`: 2 mirror, 3 rotate 180, 4 flip, 5
    transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise.
    """
    transposed = lambda: tf.transpose(image, [1, 0, 2])
    branches = [
        lambda: image,  # 0: never produced; 1: already upright
        lambda: image,
        lambda: tf.image.flip_left_right(image),
        lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image),
        transposed,
        lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(transposed(), 2),
        lambda: tf.image.rot90(image, 1),
    ]
    return tf.switch_case(tf.clip_by_value(tf.cast(orientation, tf.int32), 0, 8), branches)


def read_image(path: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """A file to upright uint8 RGB [height, width, 3]: read, decode, apply the EXIF orientation."""
    return apply_orientation(decode_image(tf.io.read_file(path)), orientation)


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG / PNG / BMP / GIF bytes to uint8 RGB [height, width, 3].

    Grayscale, RGBA, palette, 16-bit and CMYK images all come out as 8-bit RGB; a GIF gives its
    first frame.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_error(path: str) -> str | None:
    """Why `path` cannot be read as an image by `decode_image`, or None if it can."""
    try:
        decode_image(tf.io.read_file(os.fsencode(path)))
    except (tf.errors.OpError, OSError) as error:
        message = getattr(error, "message", str(error)).strip()
        return message.split("[Op:")[0].split("}}")[-1].strip() or type(error).__name__
    return None


def find_bad_images(paths: list[str], parallel: int = tf.data.AUTOTUNE) -> list[tuple[str, str]]:
    """(path, reason) for every file the tf.data decode path cannot read, in input order.

    Decodes in parallel with the same decoder training uses; failed elements are dropped by
    `ignore_errors`, and only those few are decoded again one by one to learn why.

    Args:
        paths: image files.
        parallel: decode parallelism.
    """
    if not paths:
        return []

    @tf.autograph.experimental.do_not_convert  # AutoGraph would leave a module file in /tmp
    def check(index):
        return index, tf.shape(decode_image(tf.io.read_file(tf.gather(paths_tensor, index))))

    paths_tensor = tf.constant(tf_paths(paths))
    indices = tf.data.Dataset.range(len(paths)).map(check, num_parallel_calls=parallel)
    readable = {int(index) for index, _ in indices.ignore_errors().as_numpy_iterator()}
    return [
        (path, decode_error(path) or "could not be decoded")
        for index, path in enumerate(paths)
        if index not in readable
    ]


def handle_bad_images(bad: list[tuple[str, str]], on_bad_image: str) -> None:
    """Logs each unreadable image, or raises when the config says `on_bad_image: error`."""
    if bad and on_bad_image == "error":
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        raise ValueError(
            f"{len(bad)} image(s) cannot be read:\n{listing}\n"
            "Fix or remove them, or set dataset.on_bad_image=skip to train without them."
        )
    for path, reason in bad:
        log.warning("Skipping unreadable image %s: %s", path, reason)
