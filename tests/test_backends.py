"""The whole pipeline under KERAS_BACKEND=jax: every task, predict.py and annotate.py, keras.distribution
on two devices and two hosts.

The backend is fixed when Keras is imported, so every JAX run is a `train.py` process of its own.
Tolerances were measured on CPU: FCN-32s (zero-initialised scores on frozen ImageNet MobileNet v1)
gives the same test loss under JAX and TensorFlow to 1e-7; data_parallel over two devices or two
processes equals one device to 2e-7; cached features agree across backends to 1e-4; annotate.py's
best scores to 2e-6. Random
initialisations differ between backends (each has its own generator), so runs with a randomly
initialised head are compared within a backend only.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import pipeline.layers  # noqa: F401  registers the custom layers, to load exported models
from pipeline.data import decode_image
from pipeline.run import train
from tests.conftest import CONF, compose_config, write_photo_folder
from tests.test_distribute import free_ports

# Frozen ImageNet MobileNet v1 (converted once for the module), a tiny folder, no dropout: the head's
# training is deterministic within a backend.
PHOTOS = ["backbone=mobilenet_v1", "debug=tiny", "dataset=folder", "dataset.validation_percent=25",
          "dataset.test_percent=25", "deterministic=true", "task.dropout_rate=0.0"]
# predict.py under JAX against the probabilities a JAX run wrote to predictions.csv (6 decimals there).
PREDICT_TOLERANCE = 1e-5
# annotate.py's best score per class (a probability), JAX against TensorFlow.
ANNOTATE_TOLERANCE = 1e-5  # measured: 2e-6 (coffee.png, chelsea.png at max_side=512)
FCN = ["task=fcn32", "dataset=voc_demo", "backbone=mobilenet_v1", "debug=tiny", "callbacks=minimal",
       "image_size=[64,96]", "batch_size=2", "epochs=2", "task.augmentation=null",
       "optimizer.learning_rate=1e-2", "deterministic=true"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Photos and a cache of converted weights that every run of this module reuses."""
    from pipeline.importers.slim import mobilenet_v1_weights

    root = tmp_path_factory.mktemp("backends")
    # Converted once here (about 40 s), not in the first run of each test.
    mobilenet_v1_weights(root / "cache" / "weights")
    keras.backend.clear_session()
    return {"photos": write_photo_folder(root / "photos"), "cache": root / "cache"}


def jax_env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(KERAS_BACKEND="jax", **extra)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start(tmp_path, run, *overrides, env):
    argv = [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/{run}", *overrides]
    return subprocess.Popen(argv, cwd=CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def finished(process, timeout=900) -> str:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def run_jax(tmp_path, run, *overrides, devices=1) -> tuple[dict, str]:
    log = finished(start(tmp_path, run, *overrides, env=jax_env(devices)))
    return json.loads((tmp_path / run / "metrics.json").read_text()), log


def photo_run(shared, *overrides):
    return [*PHOTOS, f"dataset.root={shared['photos']}", f"paths.cache_dir={shared['cache']}", *overrides]


def assert_close(a, b, tolerance, keys=("test/loss", "test/accuracy", "validation/loss", "validation/accuracy")):
    for key in keys:
        assert abs(a[key] - b[key]) <= tolerance, (key, a[key], b[key])


def test_transfer_under_jax_cold_then_warm_cache_and_its_model_loads_under_tensorflow(shared, tmp_path):
    features = f"task.cache_dir={tmp_path}/features"
    metrics, log = run_jax(tmp_path, "cold", *photo_run(shared, features, "epochs=3"))
    assert metrics["backend"] == "jax" and "Keras backend: jax" in log
    assert "Caching train features: 0 cache hits" in log
    for name in ("confusion_matrix.csv", "predictions.csv", "history.csv", "model.keras", "class_names.json"):
        assert (tmp_path / "cold" / name).is_file(), name
    with open(tmp_path / "cold" / "history.csv") as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    warm, log = run_jax(tmp_path, "warm", *photo_run(shared, features, "epochs=3"))
    assert "Caching train features: 18 cache hits, 0 misses" in log
    assert_close(metrics, warm, 1e-6)  # the same features, read back from the cache

    # The model trained under JAX, loaded here under TensorFlow, predicts what the run reported.
    assert keras.backend.backend() == "tensorflow"
    model = keras.saving.load_model(tmp_path / "cold" / "model.keras", safe_mode=True)
    with open(tmp_path / "cold" / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    names = json.loads((tmp_path / "cold" / "class_names.json").read_text())
    for row in rows:
        image = decode_image(open(shared["photos"] / row["relative_path"], "rb").read()).numpy()
        probabilities = model.predict(image[None], verbose=0)[0]
        assert names[int(np.argmax(probabilities))] == row["predicted_class"]
        assert abs(float(probabilities.max()) - float(row["probability"])) < 1e-4

    # predict.py under JAX, on the run's model.keras, gives the classes and probabilities the run reported.
    inputs = [str(shared["photos"] / row["relative_path"]) for row in rows]
    result = subprocess.run([sys.executable, "predict.py", f"model={tmp_path / 'cold' / 'model.keras'}",
                             f"inputs=[{','.join(inputs)}]", "top_k=1", f"hydra.run.dir={tmp_path / 'predict'}"],
                            cwd=CONF.parent, capture_output=True, text=True, env=jax_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert [record["path"] for record in records] == inputs
    for record, row in zip(records, rows):
        assert record["top_k"][0]["name"] == row["predicted_class"], record
        assert abs(record["top_k"][0]["probability"] - float(row["probability"])) < PREDICT_TOLERANCE


@pytest.mark.slow
def test_classification_with_augmentation_trains_under_jax(shared, tmp_path):
    metrics, _ = run_jax(tmp_path, "run", *photo_run(shared, "task=classification", "task.trainable_layers=3"))
    assert metrics["backend"] == "jax" and np.isfinite(metrics["test/loss"])
    with open(tmp_path / "run" / "history.csv") as file:
        assert len(list(csv.DictReader(file))) == 1


@pytest.mark.slow
def test_transfer_with_augmented_views_and_fine_tuning_under_jax(shared, tmp_path):
    metrics, log = run_jax(tmp_path, "run", *photo_run(
        shared, f"task.cache_dir={tmp_path}/features", "task.fine_tune_epochs=1", "task.fine_tune_layers=6",
        "task.augmented_views=1", "task.augmentation=[{_target_: keras.layers.RandomFlip, mode: horizontal}]"))
    assert "Caching augmented view 1/1" in log
    with open(tmp_path / "run" / "history.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1"]
    assert np.isfinite(metrics["test/loss"])


def test_fcn32_gives_the_same_metrics_under_jax_and_tensorflow(shared, tmp_path):
    overrides = [*FCN, f"paths.cache_dir={shared['cache']}"]
    jax_metrics, _ = run_jax(tmp_path / "jax", "run", *overrides, f"paths.data_dir={tmp_path}/datasets")
    tf_metrics = train(compose_config([*overrides, f"paths.data_dir={tmp_path}/datasets"], tmp_path / "tf"))
    assert jax_metrics["backend"] == "jax" and tf_metrics["backend"] == "tensorflow"
    for key in ("test/loss", "test/pixel_accuracy", "test/mean_iu", "validation/loss", "validation/mean_iu"):
        assert abs(jax_metrics[key] - tf_metrics[key]) <= 1e-4, (key, jax_metrics[key], tf_metrics[key])


@pytest.fixture(scope="module")
def one_device(shared, tmp_path_factory):
    """The reference for data parallelism: JAX on one device, 3 epochs, batches that split evenly."""
    tmp_path = tmp_path_factory.mktemp("one_device")
    return run_jax(tmp_path, "run", *photo_run(shared, "epochs=3"))[0]


def test_data_parallel_over_two_devices_equals_one_device(shared, one_device, tmp_path):
    metrics, log = run_jax(tmp_path, "run", *photo_run(shared, "epochs=3", "strategy=data_parallel"), devices=2)
    assert "data_parallel over 2 devices in 1 processes" in log
    assert "model.fit: each batch split over 2 devices" in log
    assert_close(one_device, metrics, 1e-5)


def test_two_jax_processes_on_localhost_train_one_model_and_only_process_0_writes(shared, one_device, tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    processes = [start(tmp_path, f"process{i}", *photo_run(shared, "epochs=3", "strategy=data_parallel",
                                                            f"task.cache_dir={tmp_path}/features"),
                       env=jax_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
                 for i in range(2)]
    logs = [finished(process) for process in processes]
    assert "data_parallel over 2 devices in 2 processes (this is process 1)" in logs[1]
    assert all("model.fit: each batch split over 2 devices" in log for log in logs)
    first, other = tmp_path / "process0", tmp_path / "process1"
    assert (first / "metrics.json").exists() and (first / "checkpoints" / "last.keras").exists()
    assert not any((other / name).exists() for name in ("metrics.json", "model.keras", "checkpoints",
                                                         "tensorboard", "confusion_matrix.csv"))
    assert "Caching train features: 0 cache hits, 18 misses" in logs[0]
    assert "Caching train features: 18 cache hits, 0 misses" in logs[1], "process 1 read what process 0 cached"
    assert_close(one_device, json.loads((first / "metrics.json").read_text()), 1e-5)


def test_a_strategy_of_the_other_backend_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "strategy=mirrored", f"paths.root={tmp_path}",
                             f"hydra.run.dir={tmp_path}/run"], cwd=CONF.parent, capture_output=True, text=True,
                            env=jax_env(), timeout=300)
    assert result.returncode == 1
    assert ("ValueError: strategy=mirrored is tf.distribute, which needs KERAS_BACKEND=tensorflow; the backend "
            "is jax.") in result.stderr
    assert "Traceback" not in result.stderr

    with pytest.raises(ValueError, match="data_parallel is keras.distribution, which needs KERAS_BACKEND=jax"):
        train(compose_config(["strategy=data_parallel"], tmp_path))


@pytest.mark.slow
def test_annotate_gives_the_same_annotation_under_jax_and_tensorflow(shared, tmp_path):
    from skimage import data as skimage_data

    from pipeline.annotate import annotate
    from tests.test_annotate import compose_annotate

    photos = [str(Path(skimage_data.__file__).parent / name) for name in ("coffee.png", "chelsea.png")]
    overrides = [f"inputs=[{','.join(photos)}]", f"paths.cache_dir={shared['cache']}", "max_side=512"]
    result = subprocess.run([sys.executable, "annotate.py", *overrides, f"hydra.run.dir={tmp_path / 'jax'}"],
                            cwd=CONF.parent, capture_output=True, text=True, env=jax_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    under_jax = json.loads((tmp_path / "jax" / "annotations.json").read_text())
    under_tensorflow = annotate(compose_annotate([*overrides, f"paths.output_dir={tmp_path / 'tf'}"], tmp_path))
    assert under_jax[0]["classes"][0]["name"] == "espresso"
    for a, b in zip(under_jax, under_tensorflow):
        assert a["path"] == b["path"] and a["map_size"] == b["map_size"]
        assert a["coarse_class_map"] == b["coarse_class_map"], "the same class in every cell"
        assert [entry["index"] for entry in a["classes"]] == [entry["index"] for entry in b["classes"]]
        for x, y in zip(a["classes"], b["classes"]):
            assert x["share"] == y["share"], (x, y)
            assert abs(x["best_score"] - y["best_score"]) <= ANNOTATE_TOLERANCE, (x, y)
        labels = [np.asarray(Image.open(record["labels_png"])) for record in (a, b)]
        assert np.array_equal(*labels), "the same class at every pixel"
