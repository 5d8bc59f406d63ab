"""predict.py: top-k ImageNet names on real photos with each backbone's preprocessing, and a run's model.keras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from pipeline.imagenet import imagenet_class_names
from pipeline.predict import central_crop, find_images, predict
from tests.conftest import CONF, TINY, compose_config

skimage_data = pytest.importorskip("skimage.data")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PHOTOS = [Path(skimage_data.__file__).parent / name for name in ("chelsea.png", "coffee.png", "astronaut.png")]
PHOTOS.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


def compose_predict(overrides: list[str], tmp_path: Path, config_name: str = "predict"):
    """The real conf/<config_name>.yaml with `overrides`, its folders moved under `tmp_path`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=[
            f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *overrides])


def test_imagenet_names_are_in_keras_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca" and names[285] == "Egyptian cat" and names[967] == "espresso"


def test_find_images_searches_folders_and_keeps_named_files(tmp_path):
    (tmp_path / "photos" / "nested").mkdir(parents=True)
    (tmp_path / "photos" / ".hidden").mkdir()
    for name in ("photos/b.JPG", "photos/a.png", "photos/nested/c.jpeg", "photos/.d.jpg",
                 "photos/.hidden/e.jpg", "photos/notes.txt", "single.webp"):
        (tmp_path / name).write_bytes(b"x")
    found = find_images([str(tmp_path / "photos"), str(tmp_path / "single.webp")])
    assert [Path(path).relative_to(tmp_path).as_posix() for path in found] == [
        "photos/a.png", "photos/b.JPG", "photos/nested/c.jpeg", "single.webp"]
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        find_images([str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="No inputs"):
        find_images([])


def test_central_crop_keeps_the_centre_with_the_target_aspect():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :50, 0] = 255    # red left quarter
    image[:, 50:150, 1] = 255  # green centre square
    image[:, 150:, 2] = 255   # blue right quarter
    whole_square = central_crop(tf.constant(image), (40, 40), crop_fraction=1.0).numpy()
    np.testing.assert_allclose(whole_square[..., 1], 255, atol=1e-3)
    np.testing.assert_allclose(whole_square[..., [0, 2]], 0, atol=1e-3)
    wide = central_crop(tf.constant(image), (50, 200), crop_fraction=1.0).numpy()  # the whole image
    assert wide.shape == (50, 200, 3) and wide[:, :40, 0].min() > 250 and wide[:, -40:, 2].min() > 250


def test_predict_names_real_photos_like_torchvision(tmp_path):
    """torchvision MobileNetV2's own top-1 on every photo, and its probabilities on the reference crops."""
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    cfg = compose_predict(["backbone=mobilenet_v2_torchvision",
                           f"inputs=[{','.join(map(str, PHOTOS))},{bad}]"], tmp_path)
    records = predict(cfg)
    assert json.loads((tmp_path / "run" / "predictions.json").read_text()) == records
    references = np.load(FIXTURES / "torch_references.npz")
    names = imagenet_class_names()
    for record, photo, reference in zip(records, PHOTOS, references["mobilenet_v2_probabilities"]):
        assert record["path"] == str(photo)
        assert len(record["top_k"]) == 5
        best = record["top_k"][0]
        assert best["index"] == reference.argmax(), (photo.name, best)
        assert best["name"] == names[best["index"]]
        probabilities = [entry["probability"] for entry in record["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    assert records[0]["top_k"][0]["name"] == "Egyptian cat" and records[1]["top_k"][0]["name"] == "espresso"
    assert records[-1]["path"] == str(bad) and "top_k" not in records[-1] and records[-1]["error"]

    # The classifier predict.py builds (preprocessing layer + network) is torchvision's, on the same crops.
    from hydra.utils import instantiate

    from pipeline.predict import imagenet_classifier

    classifier = imagenet_classifier(instantiate(cfg.backbone))
    probabilities = np.asarray(classifier.model(references["crops"].astype(np.float32)))
    np.testing.assert_allclose(probabilities, references["mobilenet_v2_probabilities"], atol=1e-5)


def test_predict_with_a_transfer_runs_model_and_its_class_names(photo_folder, tmp_path):
    """A model.keras as the transfer task exports it (untrained: the export path is what matters here)."""
    from hydra.utils import instantiate

    from pipeline.reports import format_confusion_matrix_csv

    task = instantiate(compose_config([*TINY, f"dataset.root={photo_folder}"], tmp_path).task)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model_path = run_dir / "model.keras"
    task.export_model(task.build_model()).save(model_path)
    (run_dir / "confusion_matrix.csv").write_text(format_confusion_matrix_csv(np.eye(3, dtype=int),
                                                                              task.dataset.class_names))
    photos = sorted(str(path) for path in (photo_folder / "coffee").iterdir())[:3]
    cfg = compose_predict([f"model={model_path}", f"inputs=[{','.join(photos)}]", "top_k=2",
                           f"paths.output_dir={tmp_path / 'predict'}"], tmp_path)
    records = predict(cfg)
    model = keras.saving.load_model(model_path, safe_mode=True)
    for record, photo in zip(records, photos):
        expected = np.asarray(model(tf.io.decode_image(tf.io.read_file(photo), channels=3)[None]))[0]
        assert [entry["name"] for entry in record["top_k"]] == [["cat", "coffee", "rocket"][i]
                                                                 for i in np.argsort(-expected)[:2]]
        assert record["top_k"][0]["probability"] == pytest.approx(expected.max(), abs=1e-6)
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        predict(compose_predict([f"model={model_path}", f"inputs=[{photos[0]}]", "class_names=[a,b]"], tmp_path))
    (run_dir / "checkpoints").mkdir()
    task.build_model().save(run_dir / "checkpoints" / "best.keras")  # what a transfer run checkpoints: the head
    with pytest.raises(ValueError, match=f"checkpoint is the head alone.*Pass the run's model.keras "
                                         f"\\({run_dir / 'model.keras'}\\)"):
        predict(compose_predict([f"model={run_dir / 'checkpoints' / 'best.keras'}", f"inputs=[{photos[0]}]"],
                                tmp_path))
    (run_dir / "class_names.json").write_text('["kitten", "espresso", "launch"]')  # preferred when present
    assert predict(cfg)[0]["top_k"][0]["name"] in ("kitten", "espresso", "launch")
    (run_dir / "confusion_matrix.csv").unlink()
    (run_dir / "class_names.json").unlink()
    with pytest.raises(FileNotFoundError, match="class_names="):
        predict(compose_predict([f"model={model_path}", f"inputs=[{photos[0]}]"], tmp_path))


def test_backbone_without_a_classifier_is_a_clear_error(tmp_path):
    cfg = compose_predict(["backbone=vgg16_hed", f"inputs=[{PHOTOS[0]}]"], tmp_path)
    with pytest.raises(ValueError, match="vgg16_hed has no ImageNet classifier"):
        predict(cfg)


def test_command_line_composes_the_config_without_loading_tensorflow():
    result = subprocess.run([sys.executable, "predict.py", "backbone=efficientnet_lite0", "inputs=[a.jpg]",
                             "--cfg", "job"], cwd=CONF.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pipeline.efficientnet_lite.EfficientNetLite0" in result.stdout and "top_k: 5" in result.stdout


@pytest.mark.slow
def test_command_line_prints_the_table_and_writes_predictions_json(tmp_path):
    result = subprocess.run(
        [sys.executable, "predict.py", f"inputs=[{PHOTOS[1]}]", "top_k=3", f"paths.root={tmp_path}",
         f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=CONF.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert " 967  " in result.stdout and "espresso" in result.stdout
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())[0]["top_k"][0]["name"] == "espresso"


def test_random_weights_are_named_in_a_warning(tmp_path, caplog):
    records = predict(compose_predict(["backbone.weights=null", f"inputs=[{PHOTOS[1]}]"], tmp_path))
    assert records[0]["top_k"][0]["probability"] < 0.01, "a random classifier: about 1/1000 each"
    assert "backbone.weights=null: mobilenet_v1's classifier has random weights" in caplog.text


def test_offline_advice_names_the_offline_backbones_not_random_weights(tmp_path):
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # no network
    result = subprocess.run([sys.executable, "predict.py", "backbone=mobilenet_v2", f"inputs=[{PHOTOS[1]}]",
                             f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"],
                            cwd=CONF.parent, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    assert "Could not get ImageNet weights for backbone 'mobilenet_v2'" in result.stderr, result.stderr[-2000:]
    assert "use backbone=mobilenet_v1, mobilenet_v2_torchvision or efficientnet_lite0" in result.stderr
    assert "weights=null" not in result.stderr


@pytest.mark.parametrize("script", ["predict", "annotate"])
def test_help_lists_only_the_backbone_group_and_runs_have_their_own_folder(script):
    result = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=CONF.parent, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert groups.split() == ["backbone:", *[f"{name}," for name in sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))[:-1]],
                              sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))[-1]]
    assert "inputs: []" in result.stdout
    hydra = subprocess.run([sys.executable, f"{script}.py", "--cfg", "hydra"], cwd=CONF.parent,
                           capture_output=True, text=True, timeout=120)
    assert f"dir: outputs/{script}/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}-${{pid:}}" in hydra.stdout


@pytest.mark.parametrize("config_name", ["predict", "annotate"])
def test_one_path_without_brackets_is_one_input(config_name, tmp_path):
    """`inputs=/path/to/photos` (what users type) is one folder, not a list of its characters."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    cfg = compose_predict([f"inputs={tmp_path / 'photos'}"], tmp_path, config_name)
    assert find_images(cfg.inputs) == [str(tmp_path / "photos" / "a.jpg")]
    cfg = compose_predict([f"inputs=[{tmp_path / 'photos'},{tmp_path / 'photos' / 'a.jpg'}]"], tmp_path,
                          config_name)
    assert find_images(cfg.inputs) == [str(tmp_path / "photos" / "a.jpg")] * 2
