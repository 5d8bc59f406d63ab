"""Export a finished run: `<run_dir>/export/` with each format, labels.txt and parity.json, or nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline.export import FILE_NAMES, FORMATS, check_formats
from pipeline.export.parity import ParityError, compare, failures
from pipeline.export.runtimes import litert_input_size, read_rgb, runner_for
from pipeline.files import atomic_write_text

log = logging.getLogger(__name__)

TEST_IMAGES = "test_images.txt"  # written by training: the test split's image files, one per line


def export_run(
    run_dir: str | os.PathLike,
    formats: list[str] | tuple[str, ...] = FORMATS,
    images: list[str] | None = None,
    max_images: int = 32,
    image_size: list[int] | tuple[int, int] | None = None,
    model=None,
) -> dict[str, dict]:
    """Writes `<run_dir>/export/` from the run's `model.keras` and checks each file with its own runtime.

    Every format is written into a hidden folder beside it and run on the test images; only when
    each one gives model.keras's probabilities (within `parity.MAX_DIFFERENCE`, top-1 agreement at
    least `parity.MIN_AGREEMENT`) does that folder replace `export/`. Otherwise it is deleted and
    a `ParityError` names the formats and their numbers: nothing half-checked is left.

    Args:
        run_dir: a finished training run (it has `model.keras` and `class_names.json`).
        formats: any of "saved_model", "litert", "onnx".
        images: image files to check parity on; None reads the run's test split (`test_images.txt`).
        max_images: check on at most this many of them (the first ones).
        image_size: (height, width) for a LiteRT file that cannot take any size; None reads the
            run's `.hydra/config.yaml`.
        model: the Keras model to write instead of model.keras (parity is still against model.keras).

    Returns:
        The contents of `parity.json`: per format its file, input note and parity numbers, and the
        Keras model's own latency.
    """
    run_dir = Path(run_dir)
    formats = check_formats(formats)
    model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise FileNotFoundError(f"No model.keras in {run_dir}: give the folder of a finished training run "
                                "(run_dir=outputs/<date>/<time>).")
    import keras  # after the checks: TensorFlow takes seconds to load (pipeline/__init__.py registers our layers)

    backend = keras.backend.backend()
    if backend != "tensorflow":
        if model is not None:
            raise ValueError("export_run(model=...) needs KERAS_BACKEND=tensorflow: the formats are written from "
                             f"TensorFlow graphs, and this process runs {backend}.")
        return _export_under_tensorflow(run_dir, formats, images, max_images, image_size, backend)
    from pipeline.export.formats import float32_copy, write_litert, write_onnx, write_saved_model

    reference = float32_copy(keras.saving.load_model(model_path, safe_mode=True))
    model = reference if model is None else float32_copy(model)
    arrays = [read_rgb(path) for path in _parity_images(run_dir, images, max_images)]
    size = image_size or _training_size(run_dir)

    writers = {"saved_model": write_saved_model, "onnx": write_onnx,
               "litert": lambda model, path: write_litert(model, path, size)}
    staging = run_dir / f".export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        class_names = json.loads((run_dir / "class_names.json").read_text(encoding="utf-8")) \
            if (run_dir / "class_names.json").is_file() else None
        if class_names is not None:
            atomic_write_text(staging / "labels.txt", "".join(f"{name}\n" for name in class_names))
        results = {"keras": {"file": "model.keras", **_keras_latency(reference, arrays)}}
        for name in formats:
            path = staging / FILE_NAMES[name]
            note = writers[name](model, path)
            test_images = arrays
            fixed = litert_input_size(path) if name == "litert" else None
            if fixed:  # LiteRT at the training size: both see the images resized to it
                test_images = [_resize(image, fixed) for image in arrays]
            try:
                numbers = compare(lambda batch: reference(batch, training=False), runner_for(path), test_images)
            except ParityError as error:
                raise ParityError(f"Export refused: {name} ({path.name}) {error}.") from error
            results[name] = {"file": FILE_NAMES[name], "input": note, **numbers}
            _log_result(name, results[name])
        broken = failures(results)
        if broken:
            raise ParityError(f"Export refused, {run_dir}/export/ not written: the exported files do not give "
                              f"model.keras's answers on {len(arrays)} test images: " + "; ".join(broken)
                              + ". Was model.keras changed after the model was exported?")
        atomic_write_text(staging / "parity.json", json.dumps(results, indent=2) + "\n")
        _replace(staging, run_dir / "export")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def _export_under_tensorflow(run_dir: Path, formats: list[str], images: list[str] | None, max_images: int,
                             image_size: list[int] | tuple[int, int] | None, backend: str) -> dict[str, dict]:
    """`export_run` in a child Python on the TensorFlow backend, for a process that runs another one.

    SavedModel, LiteRT and ONNX are written from TensorFlow graphs, and Keras's backend is fixed
    once Keras is imported; model.keras is backend-neutral, so the child loads the file this
    process wrote (e.g. at the end of a JAX training run) and exports it as `export.py` would.
    """
    import subprocess
    import sys

    arguments = dict(run_dir=str(run_dir), formats=list(formats), images=images, max_images=max_images,
                     image_size=list(image_size) if image_size else None)
    code = ("import json, sys; from pipeline.export.run import export_run; "
            "print(json.dumps(export_run(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log.info("Exporting %s with the TensorFlow backend in a child process (this one runs %s)",
             ", ".join(formats), backend)
    child = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, errors="surrogateescape")
    if child.returncode != 0:
        # The child's own last line is its error (ParityError, FileNotFoundError...): raise it here.
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"Export under TensorFlow failed (exit {child.returncode}): "
                           f"{lines[-1] if lines else 'no output'}") from ChildProcessError(child.stderr[-8000:])
    results = json.loads(child.stdout.splitlines()[-1])
    for name in formats:
        _log_result(name, results[name])
    return results


def _log_result(name: str, result: dict) -> None:
    log.info("%s: max |difference| %.2e, top-1 agreement %.2f %%, %.1f ms/image (%s)", name,
             result["max_abs_difference"], 100 * result["top1_agreement"], result["latency_ms_per_image"],
             result["input"])


def summary(results: dict[str, dict]) -> str:
    """One line per format: its file, parity numbers and input (what `export.py` prints)."""
    return "\n".join(
        f"{name:<12} {result['file']:<13} max |diff| {result['max_abs_difference']:.1e}  top-1 agreement "
        f"{100 * result['top1_agreement']:.1f} %  {result['latency_ms_per_image']:.1f} ms/image  {result['input']}"
        for name, result in results.items() if name != "keras")


def _parity_images(run_dir: Path, images: list[str] | None, max_images: int) -> list[str]:
    """The image files parity is checked on: `images`, else the run's test split."""
    if images is None:
        listed = run_dir / TEST_IMAGES
        if not listed.is_file():
            raise FileNotFoundError(f"No {TEST_IMAGES} in {run_dir} (runs before export existed lack it): pass "
                                    "the images to check the exported files on, e.g. images=[photos/].")
        images = [line for line in listed.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
                  if line]
    else:
        from pipeline.predict import find_images

        images = find_images(images)
    if not images:
        raise ValueError(f"No test images to check the exported files on in {run_dir}: pass images=[...].")
    return images[:max_images]


def _training_size(run_dir: Path) -> tuple[int, int] | None:
    """`image_size` of the run's composed config (`.hydra/config.yaml`), if Hydra wrote one."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    try:
        return tuple(OmegaConf.load(config).image_size)
    except Exception:  # noqa: BLE001  an interpolation only Hydra resolves: no size known
        return None


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((int(size[1]), int(size[0])), Image.BILINEAR))


def _keras_latency(model, images: list[np.ndarray]) -> dict[str, float]:
    """model.keras's own batch-1 latency through a traced function, for comparison."""
    import tensorflow as tf

    predict = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
    predict(images[0][None])
    start = time.perf_counter()
    for image in images:
        np.asarray(predict(image[None]))
    return {"latency_ms_per_image": 1000 * (time.perf_counter() - start) / len(images)}


def _replace(new: Path, target: Path) -> None:
    """Puts folder `new` at `target`; an existing `target` is kept until the new one is in place."""
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
