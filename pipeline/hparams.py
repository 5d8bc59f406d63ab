"""TensorBoard HParams: the values a user chose, a session start and end, for comparing runs and sweep jobs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Config groups whose chosen option is a hyperparameter (`backbone: mobilenet_v1`).
CHOICE_GROUPS = ("backbone", "task", "dataset", "optimizer", "precision", "strategy", "experiment")
# Values that differ between runs even when the user leaves them at their defaults.
MAIN_KEYS = ("backbone.weights", "optimizer.learning_rate", "batch_size", "epochs", "image_size",
             "task.dropout_rate", "task.pooling", "task.trainable_layers", "task.fine_tune_epochs", "seed")
# Overrides that name places or switches, not hyperparameters: they only make each run's table row wider.
IGNORED_PREFIXES = ("paths.", "hydra.", "callbacks.", "verbose", "resume", "optimized_metric")
STATUSES = ("success", "failure", "running")  # TensorBoard has no "interrupted": that is a failure


def _scalar(value) -> bool | int | float | str:
    """A value TensorBoard's HParams accepts: numbers, booleans and strings; anything else as text."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _choices_from_config(cfg: DictConfig) -> dict[str, str]:
    """Group choices read from the config when Hydra's runtime is not there (a composed config)."""
    choices = {}
    if OmegaConf.select(cfg, "backbone.name") is not None:
        choices["backbone"] = cfg.backbone.name
    for group in ("task", "dataset", "optimizer", "strategy"):
        target = OmegaConf.select(cfg, f"{group}._target_")
        if target is not None:
            choices[group] = str(target).rsplit(".", 1)[-1]
    if OmegaConf.select(cfg, "precision.name") is not None:
        choices["precision"] = cfg.precision.name
    return choices


def chosen_hparams(cfg: DictConfig, choices: Mapping[str, str] | None = None,
                   overrides: Iterable[str] | None = None) -> dict[str, bool | int | float | str]:
    """The hyperparameters of a run: the chosen config options, the main values, and the overrides.

    Args:
        cfg: the composed run config.
        choices: Hydra's `runtime.choices` (group -> option); None reads them from `cfg`.
        overrides: the command's overrides (`optimizer.learning_rate=1e-3`, a sweep job's included);
            each key's resolved value is logged. None: none beyond the main values.

    Returns:
        name -> value, e.g. {"backbone": "mobilenet_v1", "optimizer.learning_rate": 0.001}.
    """
    choices = dict(choices) if choices is not None else _choices_from_config(cfg)
    hparams = {group: _scalar(choices[group]) for group in CHOICE_GROUPS if choices.get(group) is not None}
    keys = list(MAIN_KEYS)
    for override in overrides or ():
        key = str(override).split("=", 1)[0].lstrip("+~")
        if key and key not in keys and key not in CHOICE_GROUPS and not key.startswith(IGNORED_PREFIXES):
            keys.append(key)
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is not None and not (OmegaConf.is_dict(value) and "_target_" in value):
            hparams[key] = _scalar(value)
    return hparams


def hydra_choices_and_overrides() -> tuple[dict[str, str] | None, list[str] | None]:
    """Hydra's group choices and the command's overrides, or (None, None) outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    choices = {group: option for group, option in hydra.runtime.choices.items() if option is not None}
    return choices, [str(override) for override in hydra.overrides.task]


def start_session(tensorboard_dir: str | Path, hparams: Mapping[str, bool | int | float | str]) -> None:
    """Writes the HParams session start: TensorBoard lists the run as running until `end_session`.

    Args:
        tensorboard_dir: the run's TensorBoard folder (the parent of `train/`, `validation/`, `test/`).
        hparams: flat name -> value, from `chosen_hparams`.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    writer = tf.summary.create_file_writer(str(tensorboard_dir))
    try:
        with writer.as_default():
            hparams_api.hparams(dict(hparams))
        writer.flush()
    finally:
        writer.close()


def end_session(tensorboard_dir: str | Path, status: str) -> None:
    """Writes the HParams session end with its status, shown in TensorBoard's HParams table.

    Args:
        tensorboard_dir: the folder `start_session` wrote to.
        status: "success", "failure" (an error, Ctrl-C, SIGTERM) or "running".
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.compat.proto import summary_pb2

    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {status!r}.")
    info = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
        status=api_pb2.Status.Value(f"STATUS_{status.upper()}"), end_time_secs=time.time()))
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(info),
                      tensor=metadata.NULL_TENSOR)
    writer = tf.summary.create_file_writer(str(tensorboard_dir))
    try:
        with writer.as_default():
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)
        writer.flush()
    finally:
        writer.close()


def end_session_if_started(output_dir: str | Path, status: str) -> None:
    """Ends the HParams session of a run that started one (train.py), else does nothing.

    Called on the way out of a failed or interrupted run; it must not hide the error that ended it.
    """
    tensorboard_dir = Path(output_dir) / "tensorboard"
    if not any(tensorboard_dir.glob("events.out.tfevents.*")):
        return
    try:
        end_session(tensorboard_dir, status)
    except Exception as error:  # the disk may be what failed
        log.warning("Could not write the TensorBoard session end: %s", error)
