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
    # export at the end of training: saved_model, litert, onnx; one name or a list (pipeline.checks.export_formats)
    formats: Any = field(default_factory=list)


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
