"""Fault injection: a folder-per-class tree full of bad, odd and hostile files still trains."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from pipeline.data import ImageFolder, apply_orientation, decode_image
from pipeline.run import train
from tests.conftest import TINY, compose_config

GOOD_ODD = ["alpha.png", "sixteen_bit.png", "gray.jpg", "cmyk.jpg", "exif_rotated.jpg", "one_pixel.png",
            "huge.jpg", b"\xff\xfename.jpg"]
BAD = {"truncated.jpg": "Invalid JPEG data", "empty.jpg": "empty", "text.jpg": "Unknown image file format",
       "loop_a.jpg": "symbolic links"}


def write_faults(folder):
    """Writes every fault of the reliability issue into one class folder."""
    from skimage import data

    photo = Image.fromarray(data.chelsea()[::4, ::4])
    photo.convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((np.asarray(photo.convert("L")).astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")
    photo.convert("L").save(folder / "gray.jpg")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    photo.save(folder / "exif_rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    Image.new("RGB", (10000, 10000), (90, 120, 60)).save(folder / "huge.jpg")
    photo.save(os.path.join(os.fsencode(folder), b"\xff\xfename.jpg"))  # not valid UTF-8
    (folder / "truncated.jpg").write_bytes((folder / "gray.jpg").read_bytes()[:500])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("just text, named .jpg")
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")


@pytest.mark.parametrize("task", ["transfer", "classification"])
def test_run_completes_lists_each_bad_file_and_uses_every_good_one(task, photo_folder, tmp_path):
    write_faults(photo_folder / "cat")
    cfg = compose_config([*TINY, f"task={task}", f"dataset.root={photo_folder}",
                          "dataset.validation_percent=10", "dataset.test_percent=10"], tmp_path)
    metrics = train(cfg)
    run_dir = tmp_path / "run"

    skipped = dict(line.split("\t") for line in
                   (run_dir / "skipped_files.txt").read_text("utf-8", "surrogateescape").splitlines())
    assert {os.path.basename(path) for path in skipped} == set(BAD) | {"loop_b.jpg"}
    for path, reason in skipped.items():
        assert BAD.get(os.path.basename(path), "symbolic links") in reason, (path, reason)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["skipped_images"] == metrics["skipped_images"] == 5

    total = 36 + len(GOOD_ODD)
    folder = ImageFolder(str(photo_folder), validation_percent=10, test_percent=10)
    scanned = sum(len(split) for split in folder.splits.values())
    assert scanned + len(folder.skipped) - len(skipped) == total, "every readable image, odd ones included, is used"
    assert {os.path.basename(path) for path, _ in folder.skipped} == {"loop_a.jpg", "loop_b.jpg"}, \
        "link loops are skipped when scanning, before any open"
    assert folder.orientations(["cat/exif_rotated.jpg"]) == [6], "and turned upright"
    if task == "transfer":
        entries = list((tmp_path / ".cache" / "features").rglob("*.tensor"))
        assert len(entries) == total


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    upright = apply_orientation(decode_image(buffer.getvalue()), tf.constant(orientation)).numpy()
    np.testing.assert_array_equal(upright, expected)
