"""Folder-per-class scanning, stable hashed splits, decoding to RGB and unreadable-file handling."""

from __future__ import annotations

import io
import os
import shutil

import keras
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from pipeline.data import SPLITS, ImageFolder, decode_image, find_bad_images, handle_bad_images
from pipeline.layers import ImagePreprocessing
from tests.conftest import TINY, compose_config, write_bad_layout, write_photo_folder


def test_classes_files_and_extensions_in_any_case(photo_folder):
    (photo_folder / "cat" / "notes.txt").write_text("not an image, wrong extension: ignored")
    (photo_folder / "cat" / ".hidden.jpg").write_bytes(b"hidden: ignored")
    folder = ImageFolder(str(photo_folder))
    assert folder.class_names == ["cat", "coffee", "rocket"]
    paths = [p for split in folder.splits.values() for p in split.relative_paths]
    assert len(paths) == 36 and any(p.endswith(".JPG") for p in paths) and any(p.endswith(".png") for p in paths)
    assert not any("notes" in p or "hidden" in p for p in paths)


def test_split_is_a_function_of_the_path_so_adding_images_moves_none(photo_folder):
    before = ImageFolder(str(photo_folder), validation_percent=20, test_percent=20)
    split_of = {p: name for name, split in before.splits.items() for p in split.relative_paths}
    for i in range(20):  # add new images to every class
        for class_name in ("cat", "coffee"):
            shutil.copy(photo_folder / class_name / f"{class_name}_000.png",
                        photo_folder / class_name / f"new_{i}.png")
    after = ImageFolder(str(photo_folder), validation_percent=20, test_percent=20)
    for name, split in after.splits.items():
        for path in split.relative_paths:
            assert split_of.get(path, name) == name, f"{path} moved from {split_of[path]} to {name}"


def test_split_shares_follow_the_percentages():
    folder = ImageFolder.__new__(ImageFolder)
    folder.validation_percent, folder.test_percent = 10, 20
    names = [folder.split_of(f"class/{i}.jpg") for i in range(20000)]
    assert abs(names.count("validation") / 20000 - 0.10) < 0.01
    assert abs(names.count("test") / 20000 - 0.20) < 0.01


def test_missing_root_single_class_and_empty_class_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ImageFolder(str(tmp_path / "nowhere"))
    write_photo_folder(tmp_path / "one", images_per_class=2)
    shutil.rmtree(tmp_path / "one" / "coffee"), shutil.rmtree(tmp_path / "one" / "rocket")
    with pytest.raises(ValueError, match="at least two"):
        ImageFolder(str(tmp_path / "one"))
    write_photo_folder(tmp_path / "empty", images_per_class=2)
    (tmp_path / "empty" / "zebra").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty" / "zebra")):
        ImageFolder(str(tmp_path / "empty"))


def _outcome(function, *args) -> str:
    try:
        function(*args)
    except (ValueError, FileNotFoundError) as error:
        return f"{type(error).__name__}: {error}"
    return "accepted"


@pytest.mark.parametrize("layout", ["one_class", "empty_class", "no_classes", "loose_images", "nowhere",
                                    "photos", "linked_classes_and_a_loop", "images_only_in_sub_folders"])
def test_the_check_before_tensorflow_and_the_scan_agree_on_every_layout(layout, tmp_path):
    """`pipeline.checks` lists the folders before TensorFlow loads; ImageFolder must accept and refuse the same."""
    from pipeline.folders import check_image_folder

    root = tmp_path / "data"
    if layout == "photos":
        write_photo_folder(root, images_per_class=2)
    elif layout == "linked_classes_and_a_loop":
        write_photo_folder(tmp_path / "elsewhere", images_per_class=2)
        root.mkdir()
        for name in ("cat", "coffee"):
            os.symlink(tmp_path / "elsewhere" / name, root / name)
        os.symlink(root, root / "cat" / "loop")
    elif layout == "images_only_in_sub_folders":
        write_photo_folder(root, images_per_class=2)
        (root / "cat" / "2024").mkdir()
        for image in (root / "cat").glob("*.*"):
            image.rename(root / "cat" / "2024" / image.name)
    elif layout != "nowhere":
        write_bad_layout(layout, root)
    early = _outcome(check_image_folder, str(root))
    assert early == _outcome(ImageFolder, str(root))
    assert (early == "accepted") == (layout in ("photos", "linked_classes_and_a_loop", "images_only_in_sub_folders"))


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,format", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                          ("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "BMP")])
def test_every_colour_mode_decodes_to_rgb(mode, format):
    from skimage import data

    rgb = Image.fromarray(data.astronaut()[::8, ::8])
    decoded = decode_image(_encoded(rgb.convert(mode), format)).numpy()
    reference = np.asarray(Image.open(io.BytesIO(_encoded(rgb.convert(mode), format))).convert("RGB"))
    assert decoded.shape == (64, 64, 3) and decoded.dtype == np.uint8
    tolerance = 4 if format == "JPEG" else 0  # JPEG decoders round colour conversion differently
    assert np.abs(decoded.astype(int) - reference).max() <= tolerance


def test_unreadable_files_are_found_with_their_reason(photo_folder):
    good = photo_folder / "cat" / "cat_002.jpg"
    (photo_folder / "cat" / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (photo_folder / "cat" / "text.jpg").write_text("this is a text file named .jpg")
    (photo_folder / "cat" / "empty.png").write_bytes(b"")
    paths = [str(p) for p in sorted((photo_folder / "cat").iterdir())]
    bad = dict(find_bad_images(paths))
    assert set(bad) == {str(photo_folder / "cat" / n) for n in ("truncated.jpg", "text.jpg", "empty.png")}
    assert "Unknown image file format" in bad[str(photo_folder / "cat" / "text.jpg")]
    assert "empty" in bad[str(photo_folder / "cat" / "empty.png")]
    with pytest.raises(ValueError, match="truncated.jpg"):
        handle_bad_images(list(bad.items()), "error")


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_preprocessing_layer_equals_keras_preprocess_input(mode):
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.imagenet_utils.preprocess_input(images.copy(), mode=mode)
    np.testing.assert_allclose(ImagePreprocessing(mode)(images), expected, rtol=1e-5, atol=1e-4)


def test_one_extension_without_brackets_is_one_extension(photo_folder, tmp_path):
    cfg = compose_config([*TINY, f"dataset.root={photo_folder}", "dataset.extensions=.PNG"], tmp_path)
    folder = instantiate(cfg.dataset)
    assert folder.extensions == (".png",)
    assert sum(len(split) for split in folder.splits.values()) == 9  # every 4th photo of 3 x 12 is a .png
    assert ImageFolder(str(photo_folder), extensions=["png", "JPG"]).extensions == (".png", ".jpg")  # dot optional


def test_linked_class_folders_and_sub_folders_are_followed_and_loops_skipped(tmp_path, caplog):
    photos = write_photo_folder(tmp_path / "elsewhere", images_per_class=4)
    root = tmp_path / "root"
    root.mkdir()
    shutil.move(str(photos / "cat"), root / "cat")
    shutil.move(str(photos / "coffee"), root / "coffee")
    os.symlink(photos / "rocket", root / "rocket")                  # a whole class is a link
    os.symlink(photos / "rocket", root / "cat" / "more_cats")       # a linked sub-folder
    os.symlink(root / "coffee", root / "coffee" / "again")          # a loop
    (root / "coffee" / "photo.webp").write_bytes(b"x")
    (root / "coffee" / "scan.TIFF").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="pipeline.data"):
        folder = ImageFolder(str(root))
    assert folder.class_names == ["cat", "coffee", "rocket"]
    paths = [path for split in folder.splits.values() for path in split.relative_paths]
    assert sum(path.startswith("rocket/") for path in paths) == 4
    assert sum(path.startswith("cat/more_cats/") for path in paths) == 4
    assert sum(path.startswith("coffee/") for path in paths) == 4  # the loop adds nothing
    assert "a symbolic link back to" in caplog.text and "again" in caplog.text
    assert "2 file(s) left out by extension (1 .tiff, 1 .webp)" in caplog.text


def test_a_class_without_training_images_warns_or_stops(tmp_path, caplog):
    root = write_photo_folder(tmp_path / "photos", images_per_class=6)
    folder = ImageFolder(str(root))
    for path in folder.splits["train"].relative_paths:  # keep only rocket's training images
        if not path.startswith("rocket/"):
            (root / path).unlink()
    with caplog.at_level("WARNING", logger="pipeline.data"):
        ImageFolder(str(root))
    assert "2 class(es) have no training images: cat, coffee" in caplog.text
    with pytest.raises(ValueError, match="have no training images: cat, coffee"):
        ImageFolder(str(root), on_bad_image="error")


def test_identical_images_across_classes_or_splits_are_reported_and_kept_in_one_split(tmp_path, caplog):
    root = write_photo_folder(tmp_path / "photos", images_per_class=12)
    folder = ImageFolder(str(root))
    assert folder.duplicates == []
    test_cat = next(p for p in folder.splits["test"].relative_paths if p.startswith("cat/"))
    train_cat = next(p for p in folder.splits["train"].relative_paths if p.startswith("cat/"))
    shutil.copy(root / test_cat, root / "rocket" / "copy_of_a_test_cat.jpg")     # another class
    for i in range(40):  # some name lands in the training split: the same bytes in two splits
        shutil.copy(root / test_cat, root / "cat" / f"again_{i}{os.path.splitext(test_cat)[1]}")
    shutil.copy(root / train_cat, root / "cat" / "z_same_split_same_class.x")    # not an image extension

    with caplog.at_level("WARNING", logger="pipeline.data"):
        folder = ImageFolder(str(root))
    group, = folder.duplicates
    assert group[0] == "cat/again_0" + os.path.splitext(test_cat)[1] and "rocket/copy_of_a_test_cat.jpg" in group
    assert "41 file(s) have the same bytes as another file in another class or split" in caplog.text
    where = {name: set(split.relative_paths) for name, split in folder.splits.items()}
    assert len([name for name in SPLITS if where[name] & set(group)]) == 1, "all copies in one split"

    dropped = ImageFolder(str(root), on_duplicate="drop")
    kept = {path for split in dropped.splits.values() for path in split.relative_paths}
    assert len(kept & set(group)) == 1 and group[0] in kept
    with pytest.raises(ValueError, match="(?s)same bytes.*dataset.on_duplicate"):
        ImageFolder(str(root), on_duplicate="error")
