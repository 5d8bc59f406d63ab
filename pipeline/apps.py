"""The command-line apps: `pipeline-train`, `-predict`, `-annotate`, `-export` (and the checkout's train.py ...).

Each is a Hydra app on the configs of `conf/`. In a checkout they are read from `conf/` at the top of
the repository; an installed package carries the same files as `pipeline/conf` (pyproject.toml maps
one onto the other) and reads them from there, so the commands work from any folder. `--config-dir
DIR` adds a folder of your own configs (e.g. `DIR/dataset/birds.yaml`) to either.

Adding an app is one function here and one line under `[project.scripts]` in pyproject.toml.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig

import pipeline.schema  # noqa: F401  registers the types of conf/train.yaml's own keys
from pipeline.checks import check_train_config
from pipeline.cli import one_line_errors, quiet_tensorflow_start
from pipeline.runs import check_not_busy


def config_path() -> str:
    """The configs installed inside the package (`pipeline/conf`), else `conf/` of the checkout it is in.

    A folder path, not `pkg://pipeline.conf`: pipeline/conf holds YAML only (no `__init__.py`, like
    conf/), and Hydra's package source needs a regular package.
    """
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return str(installed if (installed / "train.yaml").is_file() else package.parent / "conf")


CONFIG_PATH = config_path()


def _names_keep_their_bytes() -> None:
    # Paths that are not valid UTF-8 (kept as surrogate escapes) print as their original bytes.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """Trains the configured task: `pipeline-train [group=option ...] [key=value ...]`."""
    _names_keep_their_bytes()
    log = logging.getLogger("train")
    with one_line_errors(cfg.paths.output_dir, log, "; no metrics.json: this run did not finish"):
        check_not_busy(cfg.paths.output_dir)  # another live run's folder: refused before anything else
        check_train_config(cfg)  # config, ranges and data root before TensorFlow loads: a mistake takes a second
        quiet_tensorflow_start()
        from pipeline.run import summary, train as run  # here: `--help` and config errors come fast

        metrics = run(cfg)
    if metrics:  # a non-chief worker of a multi-worker run writes no reports
        print(f"{summary(metrics)}\nreports: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)  # what sweepers (Optuna) maximise


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def predict(cfg: DictConfig) -> None:
    """Classifies images: `pipeline-predict inputs=photos/ [backbone=...] [model=run/model.keras]`."""
    _names_keep_their_bytes()
    log = logging.getLogger("predict")
    with one_line_errors(cfg.paths.output_dir, log):
        if not str(cfg.model or "").endswith((".onnx", ".tflite")):  # those run without TensorFlow
            quiet_tensorflow_start()
        from pipeline.predict import format_table, predict as run

        records = run(cfg)
    print(f"{format_table(records)}\npredictions: {cfg.paths.output_dir}/predictions.json")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="annotate")
def annotate(cfg: DictConfig) -> None:
    """Annotates images with a classifier run fully convolutionally: `pipeline-annotate inputs=photo.jpg`."""
    _names_keep_their_bytes()
    log = logging.getLogger("annotate")
    with one_line_errors(cfg.paths.output_dir, log):
        quiet_tensorflow_start()
        from pipeline.annotate import annotate as run, format_classes

        records = run(cfg)
    print(f"{format_classes(records)}\nannotations: {cfg.paths.output_dir}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export(cfg: DictConfig) -> None:
    """Exports a finished run for deployment: `pipeline-export run_dir=outputs/<date>/<time> [formats=[onnx]]`."""
    _names_keep_their_bytes()
    log = logging.getLogger("export")
    with one_line_errors(cfg.paths.output_dir, log, "; nothing was exported"):
        from omegaconf import OmegaConf

        from pipeline.export import check_formats

        check_formats(cfg.formats)  # a typo is found before TensorFlow loads (seconds)
        quiet_tensorflow_start()
        from pipeline.export.run import export_run, summary

        options = OmegaConf.to_container(cfg, resolve=True)
        del options["paths"]
        results = export_run(**options)
    print(f"{summary(results)}\nexported: {cfg.run_dir}/export")
