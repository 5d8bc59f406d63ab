"""The same command and seed give the same metrics whether weights and features are cached or not."""

from __future__ import annotations

import json

import pytest

from pipeline.run import train
from tests.conftest import TINY, compose_config, write_photo_folder

# Genuine MobileNet v1 weights: the first run converts them from the packaged graph, the second reads
# the converted file (and, for transfer, every cached feature). Nothing else differs between the two.
CONVERTED = ["backbone=mobilenet_v1", "backbone.weights=imagenet"]
FOLDER = [*TINY[2:], "epochs=2", "dataset.root={photos}"]  # TINY without its random-weights backbone
TASKS = {
    "transfer": [*FOLDER, "task=transfer"],
    # deterministic: training convolutions on CPU otherwise sums gradients in a varying order
    "classification": [*FOLDER, "task=classification", "task.trainable_layers=2", "deterministic=true"],
    "fcn32": ["debug=tiny", "task=fcn32", "dataset=voc_demo", "image_size=[64,96]", "batch_size=2",
              "epochs=1", "callbacks=minimal", "task.score_initializer=glorot_uniform"],
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos"), images_per_class=8)


@pytest.mark.parametrize("task", ["transfer", pytest.param("classification", marks=pytest.mark.slow),
                                  pytest.param("fcn32", marks=pytest.mark.slow)])  # 40 and 35 s
def test_a_cold_and_a_warm_cache_give_identical_metrics(task, photos, tmp_path):
    overrides = [*CONVERTED, *(o.format(photos=photos) for o in TASKS[task]),
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    runs = []
    for attempt in ("cold", "warm"):
        cfg = compose_config([*overrides, f"paths.output_dir={tmp_path / attempt}"], tmp_path)
        runs.append(train(cfg))
        assert any((tmp_path / "cache" / "weights").glob("*.weights.h5")), "the weights were converted"
    cold, warm = runs
    assert cold == warm
    assert json.loads((tmp_path / "cold" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "warm" / "metrics.json").read_text())
