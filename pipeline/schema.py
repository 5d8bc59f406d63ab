"""Types of the run-level config values, so `epochs=ten` fails when the config is composed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class Paths:
    root: str = MISSING
    data_dir: str = MISSING
    cache_dir: str = MISSING
    # Hydra's runtime.output_dir is None under `--cfg job --resolve`, which prints and does not run.
    output_dir: Optional[str] = MISSING
    resume_dir: str = MISSING


@dataclass
class Export:
    formats: list[str] = field(default_factory=list)  # export at the end of training: saved_model, litert, onnx


@dataclass
class TrainConfig:
    """conf/train.yaml's own keys; each group (backbone, task, ...) is checked by its `_target_`."""

    seed: int = 42
    epochs: int = 10
    batch_size: int = 32
    image_size: Any = MISSING  # [height, width] or one int for a square: pipeline.checks.image_size_pair
    verbose: Any = "auto"
    jit_compile: Any = "auto"
    deterministic: bool = False
    resume: bool = True
    optimized_metric: str = "validation/accuracy"
    paths: Paths = field(default_factory=Paths)
    export: Export = field(default_factory=Export)
    backbone: Any = MISSING
    task: Any = MISSING
    dataset: Any = MISSING
    strategy: Any = MISSING
    precision: Any = MISSING
    optimizer: Any = MISSING
    callbacks: Any = MISSING


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
# paths.resume_dir: the same command (the same overrides) finds the state it left when interrupted.
OmegaConf.register_new_resolver(
    "short_hash", lambda text: hashlib.sha256(str(text).encode()).hexdigest()[:16], replace=True
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (lowest allowed, whether the lowest is allowed, highest allowed or None, what it is)
RANGES = {
    "batch_size": (1, True, None, "the global batch: images per training step"),
    "epochs": (1, True, None, "passes over the training data"),
    "optimizer.learning_rate": (0, False, None, "the optimizer's step size, e.g. 1e-3"),
    "task.dropout_rate": (0, True, 1, "the share of features dropped in training, below 1"),
    "task.fine_tune_epochs": (0, True, None, "epochs of fine-tuning after the head (0: none)"),
    "task.fine_tune_learning_rate": (0, False, None, "the fine-tuning step size, e.g. 1e-5"),
    "task.augmented_views": (0, True, None, "augmented copies cached per training image (0: none)"),
}


def check_run_config(cfg: Any) -> None:
    """Checks the ranges types cannot express, naming the key and what it allows; fixes int learning rates.

    Runs before anything is built, so `batch_size=0` or `epochs=-3` stop at once with one line
    instead of a ZeroDivisionError after caching or an untrained model that looks finished.
    A learning rate typed as an integer (`optimizer.learning_rate=1`) becomes a float, as Keras requires.

    Args:
        cfg: the composed `conf/train.yaml`.

    Raises:
        ValueError: a value is out of its range or not a number.
    """
    for key, (low, low_allowed, high, meaning) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue  # absent from this task, or null
        if key.endswith("learning_rate") and OmegaConf.is_dict(value):
            continue  # a learning-rate schedule: Keras checks it
        bound = f">= {low}" if low_allowed else f"> {low}"
        allowed = f"{bound} and < {high}" if high is not None else bound
        if not _number(value) or value < low or (value == low and not low_allowed) or (
                high is not None and value >= high):
            raise ValueError(f"{key}={value!r} is out of range: it must be a number {allowed} ({meaning}). "
                             f"Set {key}=<value> on the command line or in the config.")
        if key.endswith("learning_rate") and isinstance(value, int):
            OmegaConf.update(cfg, key, float(value))

