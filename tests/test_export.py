"""Deployable models: one answer however the model is called, and SavedModel / LiteRT / ONNX files that
give model.keras's answers in their own runtimes, on real photos."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra.utils import instantiate
from PIL import Image
from skimage import data

from pipeline.export.parity import ParityError
from pipeline.export.run import export_run
from pipeline.export.runtimes import read_rgb, runner_for
from pipeline.predict import predict
from pipeline.run import train
from tests.conftest import CONF, TINY, compose_config, write_photo_folder
from tests.test_fcn32 import FAST
from tests.test_predict import compose_predict

ROOT = CONF.parent
# Real weights: a random MobileNet's features vanish at 64x64, which would hide Dropout and any export error.
IMAGENET = ["backbone=mobilenet_v1", "backbone.weights=imagenet"]
ALL_FORMATS = "export.formats=[saved_model,litert,onnx]"


def photos() -> list[np.ndarray]:
    """scikit-image's photos at three sizes, none of them the training size."""
    return [data.chelsea()[:200, :260], data.coffee()[50:250, 100:300], data.astronaut()[:180, 40:220]]


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # MobileNet v1's converted ImageNet weights, once per module


def variant_model(kind: str, tmp_path: Path, cache: Path) -> keras.Model:
    """The exported model of a task as training saves it (untrained head: the export path is what matters)."""
    folder = write_photo_folder(tmp_path / "photos", images_per_class=4)
    common = [*TINY, *IMAGENET, f"dataset.root={folder}", f"paths.cache_dir={cache}"]
    if kind == "fcn32":
        overrides = [*FAST, *IMAGENET, "dataset=voc_demo", f"paths.cache_dir={cache}",
                     "task.classifier_layers=[{name: fc, filters: 16, kernel_size: 1, dropout_rate: 0.5}]"]
    else:
        overrides = {"transfer": common, "transfer_fine_tuned": [*common, "task.fine_tune_layers=4"],
                     "classification": [*common, "task=classification"],
                     "classification_fine_tuned": [*common, "task=classification", "task.trainable_layers=4"]}[kind]
    task = instantiate(compose_config(overrides, tmp_path).task)
    model = task.build_model()
    if kind == "transfer_fine_tuned":
        model = task.fine_tune_model(model)
    path = tmp_path / "run" / "model.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    task.export_model(model).save(path)
    (path.parent / "class_names.json").write_text(json.dumps(task.dataset.class_names))
    return keras.saving.load_model(path)


@pytest.mark.parametrize("kind", ["transfer", "classification", "fcn32",
                                  pytest.param("transfer_fine_tuned", marks=pytest.mark.slow),
                                  pytest.param("classification_fine_tuned", marks=pytest.mark.slow)])
def test_the_model_gives_one_answer_however_it_is_called(kind, tmp_path, weights_cache):
    """Before the fix, `model(x)` ran the head's Dropout (Resizing defaults to training=True) and eager
    Resizing kept uint8: 0.2 apart between two calls, 5e-3 from `predict`."""
    model = variant_model(kind, tmp_path, weights_cache)
    for image in photos():
        batch = image[None]
        expected = model.predict(batch, verbose=0)
        for name, got in (("model(x)", model(batch)), ("model(x) again", model(batch)),
                          ("model(x, training=False)", model(batch, training=False))):
            np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, err_msg=name)
    if kind != "fcn32":  # predict.py on the same photos, read from files
        files = []
        for index, image in enumerate(photos()):
            files.append(tmp_path / f"photo_{index}.png")
            Image.fromarray(image).save(files[-1])
        records = predict(compose_predict([f"model={tmp_path / 'run' / 'model.keras'}", f"top_k={3}",
                                           f"inputs=[{','.join(map(str, files))}]"], tmp_path))
        for record, image in zip(records, photos()):
            expected = model.predict(image[None], verbose=0)[0]
            for entry in record["top_k"]:
                assert entry["probability"] == pytest.approx(expected[entry["index"]], abs=1e-5)


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, weights_cache) -> Path:
    """A tiny transfer run that exports every format at the end of training."""
    tmp_path = tmp_path_factory.mktemp("transfer")
    folder = write_photo_folder(tmp_path / "photos")
    train(compose_config([*TINY, *IMAGENET, f"dataset.root={folder}", f"paths.cache_dir={weights_cache}",
                          ALL_FORMATS], tmp_path))
    return tmp_path / "run"


@pytest.fixture(scope="module")
def fcn_run(tmp_path_factory, weights_cache) -> Path:
    tmp_path = tmp_path_factory.mktemp("fcn")
    train(compose_config([*FAST, *IMAGENET, "dataset=voc_demo", f"paths.cache_dir={weights_cache}", ALL_FORMATS],
                         tmp_path))
    return tmp_path / "run"


def check_every_format(run_dir: Path, segmentation: bool) -> None:
    """Each file, run here by its own runtime, gives model.keras's probabilities on the test images."""
    export = run_dir / "export"
    assert sorted(path.name for path in export.iterdir()) == ["labels.txt", "model.onnx", "model.tflite",
                                                               "parity.json", "saved_model"]
    assert export.joinpath("labels.txt").read_text().splitlines() == json.loads(
        (run_dir / "class_names.json").read_text())
    parity = json.loads((export / "parity.json").read_text())
    test_images = (run_dir / "test_images.txt").read_text().splitlines()
    model = keras.saving.load_model(run_dir / "model.keras")
    for name, file in (("saved_model", "saved_model"), ("litert", "model.tflite"), ("onnx", "model.onnx")):
        assert parity[name]["max_abs_difference"] <= 1e-4 and parity[name]["top1_agreement"] >= 0.999, name
        assert parity[name]["images"] == min(32, len(test_images)) and "any size" in parity[name]["input"]
        run = runner_for(export / file)
        for path in test_images[:4]:
            image = read_rgb(path)
            expected = model.predict(image[None], verbose=0)
            got = run(image[None])
            assert got.shape == expected.shape == ((1, *image.shape[:2], 21) if segmentation else (1, 3)), name
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{name} on {path}")
            assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.999, name


def test_training_exports_every_format_with_parity_checked_by_each_runtime(transfer_run):
    check_every_format(transfer_run, segmentation=False)
    # The SavedModel's serve signature takes uint8 images of any size, as TF Serving would call it.
    serve = tf.saved_model.load(str(transfer_run / "export" / "saved_model")).signatures["serve"]
    model = keras.saving.load_model(transfer_run / "model.keras")
    for image in photos():
        (output,) = serve(image=tf.constant(image[None])).values()
        np.testing.assert_allclose(output.numpy(), model.predict(image[None], verbose=0), atol=1e-5)


def test_fcn32_exports_per_pixel_probabilities_at_the_input_size_in_every_format(fcn_run):
    check_every_format(fcn_run, segmentation=True)


def test_export_refuses_and_removes_what_it_wrote_when_a_file_disagrees(transfer_run):
    before = {path.name: path.stat().st_mtime_ns for path in (transfer_run / "export").iterdir()}
    tampered = keras.saving.load_model(transfer_run / "model.keras")
    dense = tampered.get_layer("head").get_layer("predictions")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + np.array([0.5, 0.0, 0.0], np.float32)])  # model.keras no longer matches
    with pytest.raises(ParityError, match=r"onnx: max \|difference\| .* \(limit 0.0001\)"):
        export_run(transfer_run, ["onnx"], model=tampered)
    assert {path.name: path.stat().st_mtime_ns for path in (transfer_run / "export").iterdir()} == before
    assert not [path for path in transfer_run.iterdir() if path.name.startswith(".export")], "nothing left behind"

    with pytest.raises(ValueError, match=r"Unknown export format\(s\) \['tflite'\]: choose from"):
        export_run(transfer_run, ["tflite"])
    with pytest.raises(FileNotFoundError, match="No model.keras in"):
        export_run(transfer_run / "export", ["onnx"])


def readme_block(after: str) -> str:
    """The first ```python block of README.md after the line containing `after`."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_readme_recipes_load_every_run_and_serve_onnx_without_tensorflow(transfer_run, fcn_run, tmp_path):
    """The README's two snippets, run as a user would (a fresh process, only the run folder changed)."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(photos()[1]).save(photo, quality=95)
    load = readme_block("## Export and deploy")
    checks = []
    for run_dir in (transfer_run, fcn_run):
        code = load.replace("outputs/<date>/<time>", str(run_dir)).replace("photo.jpg", str(photo))
        checks.append(code + "\nprint(probabilities.shape)\n")
    # `import pipeline` before Keras (the first line here) registers as soon as Keras is imported.
    checks.insert(0, "import sys, pipeline\nassert 'keras' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", "\n".join(checks)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(3,)\n" in result.stdout and "(200, 200, 21)\n" in result.stdout, result.stdout

    serve = readme_block("needs only `onnxruntime`").replace("outputs/<date>/<time>", str(transfer_run))
    serve = serve.replace("photo.jpg", str(photo)) + "import sys; assert 'tensorflow' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", serve], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    label, probability = result.stdout.split()
    expected = keras.saving.load_model(transfer_run / "model.keras").predict(read_rgb(photo)[None], verbose=0)[0]
    assert label == ["cat", "coffee", "rocket"][expected.argmax()]
    assert float(probability) == pytest.approx(expected.max(), abs=1e-5)


def test_predict_classifies_with_the_onnx_and_litert_files_like_model_keras(transfer_run, tmp_path):
    # PNGs: Pillow and TensorFlow decode them identically. JPEGs differ by a few grey levels (TensorFlow's
    # fast integer IDCT), which moves probabilities by up to ~5e-3 (README, "Export and deploy").
    test_images = [path for path in (transfer_run / "test_images.txt").read_text().splitlines()
                   if path.endswith(".png")]
    assert test_images
    results = {}
    for file in ("model.keras", "export/model.onnx", "export/model.tflite"):
        cfg = compose_predict([f"model={transfer_run / file}", f"inputs=[{','.join(test_images)}]", "top_k=3",
                               f"paths.output_dir={tmp_path / file.replace('/', '_')}"], tmp_path)
        results[file] = predict(cfg)
    for keras_record, onnx_record, litert_record in zip(*results.values()):
        for record in (onnx_record, litert_record):
            assert [e["name"] for e in record["top_k"]] == [e["name"] for e in keras_record["top_k"]]
            for entry, reference in zip(record["top_k"], keras_record["top_k"]):
                assert entry["probability"] == pytest.approx(reference["probability"], abs=1e-4)


def test_a_mixed_precision_model_is_exported_in_float32(tmp_path, weights_cache):
    from pipeline.export.formats import float32_copy

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = variant_model("transfer", tmp_path, weights_cache)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("head").get_layer("pool").dtype_policy.name == "mixed_float16"
    copy = float32_copy(model)
    policies = {layer.dtype_policy.name for outer in copy.layers
                for layer in (outer.layers if isinstance(outer, keras.Model) else [outer])}
    assert policies == {"float32"}
    image = photos()[0][None]
    np.testing.assert_allclose(copy.predict(image, verbose=0), model.predict(image, verbose=0), atol=2e-2)
    assert float32_copy(copy) is copy, "a float32 model is exported as it is"


def test_export_command_line_writes_the_formats_and_a_bad_format_is_one_line(transfer_run, tmp_path):
    result = subprocess.run([sys.executable, "export.py", f"run_dir={transfer_run}", "formats=[onnx,tflite]",
                             f"hydra.run.dir={tmp_path}/bad"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Unknown export format(s) ['tflite']: choose from ['saved_model', 'litert', 'onnx']" in result.stderr
    assert "TFLite files are written by litert (model.tflite)." in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["jax", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_export_command_line_exports_a_run_under_either_backend(backend, transfer_run, tmp_path):
    """Under JAX, export.py (like a JAX training run with export.formats) exports in a TensorFlow child."""
    run_dir = tmp_path / "run"  # a copy: the module's run keeps its export for the other tests
    shutil.copytree(transfer_run, run_dir, ignore=shutil.ignore_patterns("export", "checkpoints", "tensorboard"))
    result = subprocess.run([sys.executable, "export.py", f"run_dir={run_dir}", "formats=[litert]",
                             f"hydra.run.dir={tmp_path}/cli"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stderr[-3000:]
    child = "with the TensorFlow backend in a child process (this one runs jax)"
    assert (child in result.stderr) == (backend == "jax")
    assert "litert" in result.stdout and "top-1 agreement 100.0 %" in result.stdout
    assert sorted(path.name for path in (run_dir / "export").iterdir()) == ["labels.txt", "model.tflite",
                                                                         "parity.json"]


def test_litert_falls_back_to_the_training_size_when_any_size_needs_tensorflow_ops(tmp_path):
    """tf.pad with computed sizes forgets the channel count, so the convolution after it needs a Flex op at
    any size (as FCN-32s did before PadToMultiple restated it): the file is then converted at a fixed size."""
    from pipeline.export.formats import write_litert
    from pipeline.export.runtimes import litert_input_size

    class LosesChannels(keras.layers.Layer):
        def call(self, x):
            return tf.pad(x, [[0, 0], [0, tf.shape(x)[1] % 2], [0, 0], [0, 0]])

        def compute_output_shape(self, shape):
            return (shape[0], None, shape[2], shape[3])

    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = LosesChannels()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=2, padding="same")(x))
    note = write_litert(model, tmp_path / "model.tflite", (32, 48))
    assert "FIXED at the training size" in note and litert_input_size(tmp_path / "model.tflite") == (32, 48)
    run = runner_for(tmp_path / "model.tflite")
    image = photos()[0][:32, :48][None]
    np.testing.assert_allclose(run(image), model.predict(image, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="takes images of exactly 32x48 pixels"):
        run(photos()[1][None])
