"""Writes the embedded demo data set: a folder-per-class set of real photos shipped inside scikit-image."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Bump when the images, names or layout change: a folder written by another version is rebuilt.
DEMO_FORMAT = 1
# Written last, inside the temporary folder, before the rename: a folder without it (or whose files
# no longer match the sha256 it lists) is a half-built or damaged set and gets rebuilt.
MARKER_NAME = ".complete"

# LFW crops are 25x25: a 4x Lanczos upscale gives the loader an ordinary small photo to resize.
FACE_SIDE = 100
# Texture and tissue photos are 512x512: an 8x8 grid of non-overlapping 64-pixel tiles, so no two
# images of a class share a pixel and a validation tile never overlaps a training tile.
TILE_SIDE = 64
JPEG_QUALITY = 90

# Class name -> (file inside skimage/data, what it holds). Texture classes need texture features,
# faces vs non-faces need shape features; tissue is the one colour class.
SOURCES: dict[str, tuple[str, str]] = {
    "brick": ("brick.png", "grayscale brick wall, 512x512"),
    "face": ("lfw_subset.npy", "LFW face crops 0-99, 25x25"),
    "grass": ("grass.png", "grayscale grass, 512x512"),
    "gravel": ("gravel.png", "grayscale gravel, 512x512"),
    "non_face": ("lfw_subset.npy", "LFW background crops 100-199, 25x25"),
    "tissue": ("ihc.png", "colour immunohistochemistry slide, 512x512"),
}
GRAYSCALE_CLASSES = frozenset({"brick", "face", "grass", "gravel", "non_face"})
CLASS_COUNTS: dict[str, int] = {
    "brick": 64,
    "face": 100,
    "grass": 64,
    "gravel": 64,
    "non_face": 100,
    "tissue": 64,
}


def _extension(index: int) -> str:
    """Mixes formats on purpose so the loader is exercised: 75 % .jpg, 10 % .png, 10 % .JPG, 5 % .PNG."""
    if index % 20 == 19:
        return ".PNG"
    return {7: ".png", 8: ".JPG"}.get(index % 10, ".jpg")


def _keeps_one_channel(class_name: str, index: int) -> bool:
    """A few files of the grayscale classes stay single-channel; the rest are written as RGB."""
    return class_name in GRAYSCALE_CLASSES and index % 10 == 4


def expected_files() -> dict[str, list[str]]:
    """Class name -> the file names the demo set holds for it, in index order."""
    return {
        class_name: [f"{class_name}_{index:03d}{_extension(index)}" for index in range(count)]
        for class_name, count in CLASS_COUNTS.items()
    }


def _skimage_data_folder() -> Path:
    """Finds skimage/data without importing scikit-image (only its shipped files are needed)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The demo data set is written from photos that ship inside scikit-image, which is not "
            "installed. Install it (`pip install scikit-image`) or train on your own folder-per-class "
            "data with `python train.py dataset=folder dataset.root=/path/to/data`."
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _tiles(image: np.ndarray, side: int) -> list[np.ndarray]:
    """Non-overlapping `side` x `side` tiles in row-major order (tile index = row * columns + column)."""
    rows, columns = image.shape[0] // side, image.shape[1] // side
    return [
        image[row * side : (row + 1) * side, column * side : (column + 1) * side]
        for row in range(rows)
        for column in range(columns)
    ]


def _class_images(data_folder: Path) -> Iterator[tuple[str, list[Image.Image]]]:
    """Yields (class name, its images in index order), all as Pillow images without metadata."""
    # lfw_subset.npy holds floats in [0, 1]: 100 faces, then 100 non-faces.
    crops = np.round(np.load(data_folder / "lfw_subset.npy") * 255).astype(np.uint8)
    for class_name, first in (("face", 0), ("non_face", 100)):
        yield class_name, [
            Image.fromarray(crop).resize((FACE_SIDE, FACE_SIDE), Image.Resampling.LANCZOS)
            for crop in crops[first : first + 100]
        ]
    for class_name in ("brick", "grass", "gravel", "tissue"):
        file_name = SOURCES[class_name][0]
        mode = "L" if class_name in GRAYSCALE_CLASSES else "RGB"
        with Image.open(data_folder / file_name) as photo:
            # np.asarray drops the PNG's metadata (ihc.png carries XMP); only pixels are written.
            pixels = np.asarray(photo.convert(mode))
        yield class_name, [Image.fromarray(np.ascontiguousarray(tile)) for tile in _tiles(pixels, TILE_SIDE)]


def _encode(image: Image.Image, extension: str, one_channel: bool) -> bytes:
    """Encodes deterministically: fixed quality, no EXIF, no timestamps (Pillow writes none for PNG)."""
    image = image.convert("L" if one_channel else "RGB")
    buffer = io.BytesIO()
    if extension.lower() == ".png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _is_complete(folder: Path) -> bool:
    """True when the marker exists, has this format, and every file it lists has the recorded sha256."""
    try:
        manifest = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != DEMO_FORMAT:
        return False
    wanted = {f"{name}/{file}" for name, files in expected_files().items() for file in files}
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or set(recorded) != wanted:
        return False
    for relative, digest in recorded.items():
        try:
            if hashlib.sha256((folder / relative).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return True


def _check_replaceable(folder: Path) -> None:
    """Refuses to delete a folder unless it is an earlier, partial or damaged build of the demo set."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"The demo data set goes in {folder}, but that path is a file. Move it away or pick another path.")
    if (folder / MARKER_NAME).exists():
        return  # written by this module (perhaps another format version): safe to rebuild
    known = expected_files()
    for entry in folder.iterdir():
        unknown = entry.name not in known or not entry.is_dir()
        if not unknown:
            unknown = any(file.name not in known[entry.name] for file in entry.iterdir())
        if unknown:
            raise ValueError(
                f"{folder} is incomplete as a demo data set but holds {entry}, which the demo set "
                f"never writes, so it is not replaced. Delete or move {folder}, or point the demo "
                "dataset at another folder."
            )


def _build(folder: Path, data_folder: Path) -> None:
    """Writes every image and then the marker (with the sha256 of each file) into `folder`."""
    names = expected_files()
    digests: dict[str, str] = {}
    for class_name, images in _class_images(data_folder):
        if len(images) != CLASS_COUNTS[class_name]:
            raise ValueError(
                f"Expected {CLASS_COUNTS[class_name]} {class_name} images from "
                f"{data_folder / SOURCES[class_name][0]}, got {len(images)}: the installed "
                "scikit-image ships a different file. Install a scikit-image whose data matches."
            )
        (folder / class_name).mkdir()
        for index, (image, file_name) in enumerate(zip(images, names[class_name])):
            data = _encode(image, Path(file_name).suffix, _keeps_one_channel(class_name, index))
            (folder / class_name / file_name).write_bytes(data)
            digests[f"{class_name}/{file_name}"] = hashlib.sha256(data).hexdigest()
    manifest = {"format": DEMO_FORMAT, "classes": CLASS_COUNTS, "files": dict(sorted(digests.items()))}
    (folder / MARKER_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def ensure_demo_folder(path: str) -> str:
    """Makes sure `path` holds the complete demo data set, writing it on first use; returns `path`.

    A complete set is returned untouched, so its bytes (and the feature cache keyed on them) stay
    the same between runs. Otherwise the set is written into a hidden temporary sibling folder and
    renamed into place, so an interrupted build never leaves a folder that looks complete. Output
    is deterministic: the same library versions write the same bytes.

    Args:
        path: folder for the demo set, e.g. `datasets/demo`; created with its parents if missing.
            An existing folder is only replaced if it is a partial or damaged demo set.

    Returns:
        `path`, unchanged, once it holds one sub-folder per class.
    """
    folder = Path(path)
    if _is_complete(folder):
        return path
    _check_replaceable(folder)
    data_folder = _skimage_data_folder()
    counts = ", ".join(f"{name} {count}" for name, count in CLASS_COUNTS.items())
    logger.info(
        "Writing the demo data set to %s: %d classes, %d images (%s), from photos in %s.",
        folder, len(CLASS_COUNTS), sum(CLASS_COUNTS.values()), counts, data_folder,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which makes it 0700) so the folder gets the user's usual permissions.
    building = folder.parent / f".{folder.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    building.mkdir()
    try:
        _build(building, data_folder)
        if _is_complete(folder):  # another process finished first: keep its files, drop ours
            return path
        if folder.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            os.replace(folder, stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(building, folder)
        except OSError:
            if not _is_complete(folder):  # lost a race to another builder whose set is now in place
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return path
