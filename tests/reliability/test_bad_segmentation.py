"""Fault injection: bad segmentation data is a clear error naming the file, never a silent mistake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.segmentation import COCOSegmentation, VOCSegmentation
from tests.conftest import CONF
from tests.test_segmentation_data import COCO_SPLITS, voc_demo_mask, write_coco_folder, write_voc_folder


def test_mask_of_another_size_than_its_image_names_both_files(tmp_path):
    small = voc_demo_mask()[:100, :100].copy()  # the crop image is 400x300
    data = VOCSegmentation(str(write_voc_folder(tmp_path / "voc", {"crop": small})))
    with pytest.raises(ValueError, match=r"crop\.png.*is 100x100 but its image .*crop\.jpg is 400x300"):
        data.readable_splits()


def test_mask_values_out_of_range_name_the_file(tmp_path):
    bad = voc_demo_mask().copy()
    bad[10, 10] = 200
    data = VOCSegmentation(str(write_voc_folder(tmp_path / "voc", {"photo": bad})))
    with pytest.raises(ValueError, match=r"photo\.png: has value\(s\) \[200\]"):
        data.readable_splits()


def test_missing_mask_names_the_file(tmp_path):
    root = write_voc_folder(tmp_path / "voc")
    (root / "SegmentationClass" / "flipped.png").unlink()
    with pytest.raises(ValueError, match=r"missing:\n.*flipped\.png"):
        VOCSegmentation(str(root))


def test_coco_annotation_with_an_unknown_category_is_one_clear_error(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    annotations = root / "annotations" / "instances_train2017.json"
    content = json.loads(annotations.read_text())
    content["annotations"].append({**content["annotations"][0], "id": 999, "category_id": 4242})
    annotations.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"instances_train2017\.json: annotations use category ids \[4242\]"):
        COCOSegmentation(str(root), COCO_SPLITS, cache_dir=str(tmp_path / "masks")).readable_splits()

    result = subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", "task=fcn32",
         "dataset=coco", f"dataset.root={root}", "backbone=mobilenet", "backbone.weights=null", "epochs=1"],
        cwd=CONF.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "category ids [4242]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    for masks in (tmp_path / "masks", tmp_path / ".cache" / "coco_masks"):
        assert not list(masks.rglob("*.png")), "nothing is rendered from a file that is wrong"


def test_coco_polygons_of_fewer_than_three_points_are_skipped_and_listed(tmp_path, caplog):
    from pipeline.segmentation import read_mask

    root = write_coco_folder(tmp_path / "coco")
    annotations = root / "annotations" / "instances_train2017.json"
    content = json.loads(annotations.read_text())
    bottle = next(a for a in content["annotations"] if a["id"] == 100)
    content["annotations"].append({**bottle, "id": 555, "segmentation": [[50, 50, 60, 60]]})  # 2 points
    bottle["segmentation"].append([1, 1, 2, 2])  # a good polygon plus a degenerate one
    annotations.write_text(json.dumps(content))
    with caplog.at_level("WARNING", logger="pipeline.segmentation"):
        data = COCOSegmentation(str(root), COCO_SPLITS, cache_dir=str(tmp_path / "masks"))
        splits, _ = data.readable_splits()
    assert "1 annotation(s) skipped and 1 trimmed for polygons of fewer than 3 points" in caplog.text
    assert "annotation 555 (image 7)" in caplog.text and "annotation 100 (image 7)" in caplog.text
    mask = read_mask(splits["train"].mask_paths[0])
    assert (mask[5:25, 5:35] == data.class_of_category[44]).all(), "the bottle's good polygon is drawn"
