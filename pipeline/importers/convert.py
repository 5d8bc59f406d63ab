"""What every importer shares: all-or-nothing assignment, atomic `.weights.h5` files, a cache by source hash."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from pipeline.files import atomic_path

logger = logging.getLogger(__name__)


def report_problems(problems: list[str], model: keras.Model, expected: str) -> None:
    """Raises one ValueError listing every mapping problem (the first 12), or returns if there are none.

    Args:
        problems: one line per Keras weight or source tensor that does not fit.
        model: the Keras model being filled (named in the message).
        expected: what source and Keras model the mapping is for, to tell the user what fits.
    """
    if not problems:
        return
    shown = "\n  ".join(problems[:12])
    if len(problems) > 12:
        shown += f"\n  ... and {len(problems) - 12} more"
    raise ValueError(
        f"Cannot map the weights onto Keras {model.name!r} ({len(problems)} problems):\n  {shown}\n"
        f"Expected {expected}."
    )


def assign_all(model: keras.Model, values: dict[str, np.ndarray], problems: list[str], expected: str) -> None:
    """Assigns `values` (Keras variable path -> array) to every weight of `model`, or nothing.

    Every weight of the model must have a value of its exact shape; otherwise nothing is assigned and
    one ValueError lists all the problems (those found by the caller included).

    Args:
        model: the Keras model to fill.
        values: variable path (`"block_1_expand/kernel"`) -> array.
        problems: problems the caller already found (unused source tensors, missing ones).
        expected: what fits, for the error message.
    """
    problems = list(problems)
    for variable in model.weights:
        value = values.get(variable.path)
        if value is None:
            problems.append(f"{variable.path}: no source tensor for this Keras weight")
        elif tuple(value.shape) != tuple(variable.shape):
            problems.append(f"{variable.path}: Keras expects shape {tuple(variable.shape)}, the source gives "
                            f"{tuple(value.shape)}")
    if not model.weights:
        problems.append("the model has no weights to fill")
    report_problems(problems, model, expected)
    for variable in model.weights:
        variable.assign(np.asarray(values[variable.path], dtype=variable.dtype))


def save_weights_atomically(path: Path, model: keras.Model) -> None:
    """Saves weights under a hidden temporary name beside `path`, then renames it onto `path`.

    `atomic_path`'s temporary name ends with the target's name, so `save_weights` (which insists on
    `.weights.h5`) accepts it; no cache lookup ever reads it, and a killed conversion leaves only that.
    """
    with atomic_path(path) as temporary:
        model.save_weights(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())


def copy_matching_layers(source: keras.Model, target: keras.Model) -> None:
    """Copies every weighted layer of `target` from the layer of the same name in `source`."""
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())


def cache_paths(cache_dir: str | os.PathLike, stem: str, source_sha256: str) -> tuple[Path, Path]:
    """(full classifier, conv base) file names; the source's sha256 prefix keeps other sources apart."""
    stem = f"{stem}-{source_sha256[:16]}"
    cache_dir = Path(cache_dir)
    return cache_dir / f"{stem}.weights.h5", cache_dir / f"{stem}_notop.weights.h5"


def convert_classifier(
    cache_dir: str | os.PathLike,
    stem: str,
    source_sha256: str,
    build: Callable[[bool], keras.Model],
    fill: Callable[[keras.Model], None],
    description: str,
) -> tuple[Path, Path]:
    """Builds the full classifier, fills it, copies its base into the model without top, saves both.

    Args:
        cache_dir: folder that receives the two `.weights.h5` files (created if missing).
        stem: file name stem, e.g. "mobilenet_v2_torchvision".
        source_sha256: sha256 of the source file(s), whose prefix goes into the names.
        build: `(include_top) -> Keras model with random weights`.
        fill: assigns the source's tensors to the full classifier (raises on any mismatch).
        description: what is converted from where, for the log.

    Returns:
        (full classifier, conv base) file paths.
    """
    full_path, notop_path = cache_paths(cache_dir, stem, source_sha256)
    logger.info("Converting %s into %s", description, cache_dir)
    start = time.perf_counter()
    full = build(True)
    fill(full)
    base = build(False)
    copy_matching_layers(full, base)
    save_weights_atomically(notop_path, base)
    save_weights_atomically(full_path, full)
    logger.info("Converted in %.1f s: %s, %s", time.perf_counter() - start, full_path.name, notop_path.name)
    return full_path, notop_path
