"""Run exported models with their own runtimes: onnxruntime, the LiteRT interpreter, TensorFlow's SavedModel.

Nothing here imports TensorFlow except `saved_model_runner`, so a `.onnx` or `.tflite` file serves
with `onnxruntime` or `ai-edge-litert`, `numpy` and `pillow` alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 [1, height, width, 3] -> float32 outputs


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as upright uint8 RGB [height, width, 3] (EXIF orientation applied, as in training)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def onnx_runner(path: str | os.PathLike) -> Runner:
    """`model.onnx` through onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"Running {path} needs onnxruntime: pip install onnxruntime.") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def litert_interpreter(path: str | os.PathLike):
    """The LiteRT interpreter of `ai-edge-litert`, or TensorFlow's `tf.lite.Interpreter` without it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tensorflow.lite import Interpreter
        except ImportError as error:
            raise ImportError(f"Running {path} needs the LiteRT interpreter: pip install ai-edge-litert.") from error
    return Interpreter(model_path=str(path))


def litert_runner(path: str | os.PathLike) -> Runner:
    """`model.tflite` through the LiteRT interpreter, resized to each batch when its input is dynamic."""
    interpreter = litert_interpreter(path)
    source = interpreter.get_input_details()[0]
    fixed = tuple(int(side) for side in source["shape_signature"][1:3])
    allocated: list[tuple] = [()]

    def run(images: np.ndarray) -> np.ndarray:
        if -1 not in fixed and tuple(images.shape[1:3]) != fixed:
            raise ValueError(f"{path} takes images of exactly {fixed[0]}x{fixed[1]} pixels (converted at a fixed "
                             f"size); got {images.shape[1]}x{images.shape[2]}. Resize them first.")
        if allocated[0] != images.shape:
            interpreter.resize_tensor_input(source["index"], list(images.shape))
            interpreter.allocate_tensors()
            allocated[0] = images.shape
        interpreter.set_tensor(source["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run


def litert_input_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (height, width) a `.tflite` file was converted at, or None when it takes any size."""
    signature = litert_interpreter(path).get_input_details()[0]["shape_signature"]
    return None if -1 in signature[1:3] else (int(signature[1]), int(signature[2]))


def saved_model_runner(path: str | os.PathLike) -> Runner:
    """A SavedModel's `serve` signature through TensorFlow."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serve"]
    name = next(iter(serve.structured_input_signature[1]))  # signatures take keyword arguments only
    return lambda images: next(iter(serve(**{name: tf.constant(images)}).values())).numpy()


def runner_for(path: str | os.PathLike) -> Runner:
    """The runner of an exported file, chosen by its name: `.onnx`, `.tflite` or a SavedModel folder."""
    path = Path(path)
    if path.suffix == ".onnx":
        return onnx_runner(path)
    if path.suffix == ".tflite":
        return litert_runner(path)
    if (path / "saved_model.pb").is_file():
        return saved_model_runner(path)
    raise ValueError(f"{path} is not an exported model: give a .onnx or .tflite file or a SavedModel folder.")
