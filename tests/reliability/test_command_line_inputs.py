"""predict.py and annotate.py on awkward inputs: file names that are not valid UTF-8."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline.annotate import annotate
from pipeline.predict import predict
from tests.test_predict import compose_predict

NAME = b"\xff\xfephoto.jpg"  # not valid UTF-8: Python keeps it as surrogate escapes


@pytest.fixture
def awkward_folder(tmp_path) -> Path:
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(os.path.join(os.fsencode(folder), NAME))
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    return folder


# A random-weights MobileNet: what is tested is the file handling, not the classes.
RANDOM = ["backbone=mobilenet", "backbone.weights=null"]


def test_predict_reads_a_file_whose_name_is_not_utf8(awkward_folder, tmp_path):
    records = predict(compose_predict([*RANDOM, f"inputs={awkward_folder}"], tmp_path))
    assert [os.fsencode(record["path"]) for record in records] == sorted(
        os.path.join(os.fsencode(awkward_folder), name) for name in (NAME, b"coffee.jpg"))
    assert all("top_k" in record and "error" not in record for record in records), records
    assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 2


def test_annotate_reads_a_file_whose_name_is_not_utf8(awkward_folder, tmp_path):
    records = annotate(compose_predict([*RANDOM, f"inputs={awkward_folder}", "max_side=128"], tmp_path,
                                       "annotate"))
    assert len(records) == 2 and all("classes" in record for record in records), records
    for record in records:
        assert Path(record["annotation_png"]).is_file()
