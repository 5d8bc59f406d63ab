"""One training run, start to finish: config -> strategy -> data -> model -> fit -> reports -> export."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.callbacks import ResumeState
from pipeline.distribute import (KERAS_DISTRIBUTIONS, barrier, check_backend, even_batches,
                                 fix_keras_multi_worker_fit, is_chief, saving_is_collective)
from pipeline.files import atomic_path, atomic_write_text
from pipeline.reports import merge_metrics_json, write_hparams, write_skipped_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains the configured task and writes reports and `model.keras` into the run folder.

    Under a multi-worker strategy every worker runs this function; the chief alone computes
    the feature cache, writes checkpoints and reports, the others write to a temporary folder.

    Args:
        cfg: the composed `conf/train.yaml`.

    Returns:
        The metrics also written to `metrics.json` (empty on non-chief workers).
    """
    backend = keras.backend.backend()
    check_backend(cfg.strategy._target_, strategy_choice())
    if backend == "jax":
        keras.distribution.set_distribution(None)  # a previous sweep job's data_parallel
        try:
            tf.config.set_visible_devices([], "GPU")  # TensorFlow only reads data: the GPUs are JAX's
        except RuntimeError:  # TensorFlow's runtime already started (an earlier job in this process)
            pass
    # First: multi-worker, multi-process and logical-CPU set-ups need a fresh runtime.
    strategy = instantiate(cfg.strategy)
    log.info("Keras backend: %s; strategy: %s", backend, type(strategy).__name__)
    keras.backend.clear_session()  # sweeps in one process: free the previous job's models
    if isinstance(strategy, KERAS_DISTRIBUTIONS):
        keras.distribution.set_distribution(strategy)  # clear_session forgot it
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(instantiate(cfg.precision))
    chief = is_chief(strategy)
    if not chief:  # every path below follows paths.output_dir
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="worker-")
    output_dir = Path(cfg.paths.output_dir)
    tensorboard_dir = output_dir / "tensorboard"
    task = instantiate(cfg.task)  # also builds the backbone and scans the dataset

    with strategy.scope():
        model = task.build_model()
        model.compile(optimizer=instantiate(cfg.optimizer, _convert_="all"), loss=task.loss,
                      metrics=task.metrics(), jit_compile=cfg.jit_compile)
    if chief:
        data = task.datasets(cfg.batch_size)  # transfer: runs the frozen base once per uncached image
    barrier(strategy, "features cached")
    if not chief:
        data = task.datasets(cfg.batch_size)  # the chief has cached every feature: reads only
    write_skipped_files(output_dir, data.skipped)

    callbacks = [c for c in instantiate(cfg.callbacks, _convert_="all").values() if c is not None]
    history = fit(model, data, strategy, callbacks, cfg, chief, phase="head", first_epoch=0,
                  end_epoch=cfg.epochs)
    if task.fine_tune_epochs:  # transfer: unfreeze the top of the base and train on images
        with strategy.scope():
            model = task.fine_tune_model(model)
            optimizer = instantiate(cfg.optimizer, learning_rate=task.fine_tune_learning_rate, _convert_="all")
            model.compile(optimizer=optimizer, loss=task.loss, metrics=task.metrics(),
                          jit_compile=cfg.jit_compile)
        data = task.image_datasets(cfg.batch_size)
        history = fit(model, data, strategy, callbacks, cfg, chief, phase="fine_tune",
                      first_epoch=cfg.epochs, end_epoch=cfg.epochs + task.fine_tune_epochs)

    if not chief:
        if saving_is_collective():  # the chief's save below waits for this one
            with atomic_path(output_dir / "model.keras") as path:
                task.export_model(model).save(path)
        shutil.rmtree(output_dir, ignore_errors=True)
        return {}
    with atomic_path(output_dir / "model.keras") as path:
        task.export_model(model).save(path)
    atomic_write_text(output_dir / "class_names.json", json.dumps(task.dataset.class_names))  # output order
    # Reports; metrics.json is written last of all, so a run folder that has it is a finished run.
    metrics = task.evaluate(model, data, output_dir, tensorboard_dir, step=history.epoch[-1] + 1
                            if history.epoch else cfg.epochs)
    write_hparams(tensorboard_dir, OmegaConf.to_container(cfg, resolve=True), metrics)
    metrics = merge_metrics_json(output_dir / "metrics.json", {"backend": backend})  # not a TensorBoard scalar
    if cfg.resume:
        shutil.rmtree(cfg.paths.resume_dir, ignore_errors=True)  # finished: nothing to resume
    log.info("%s. Reports, model.keras and TensorBoard logs are in %s", summary(metrics), output_dir)
    return metrics


def fit(model, data, strategy, callbacks, cfg, chief: bool, phase: str, first_epoch: int,
        end_epoch: int) -> keras.callbacks.History:
    """`model.fit` from where an interrupted run of the same command stopped, if it did.

    Args:
        model: the compiled model.
        data: the task's datasets.
        strategy: the distribution strategy the model was built in.
        callbacks: the configured Keras callbacks.
        cfg: the run config (`epochs`, `resume`, `paths.resume_dir`, `verbose`).
        chief: whether this worker saves the resume state.
        phase: "head" or "fine_tune": each phase resumes on its own.
        first_epoch: the phase's first epoch.
        end_epoch: one past its last epoch.
    """
    if cfg.resume:
        resume = ResumeState(Path(cfg.paths.resume_dir) / phase, save=chief)
        with strategy.scope():
            first_epoch = max(first_epoch, resume.restore(model))
        if first_epoch >= end_epoch:
            log.info("Every %s epoch had finished (%s): evaluating", phase, resume.directory)
        elif first_epoch:
            log.info("Resuming %s training at epoch %d from %s", phase, first_epoch + 1, resume.directory)
        if not chief and saving_is_collective():  # saves with the chief, into its own temporary folder
            resume = ResumeState(Path(cfg.paths.output_dir) / "resume" / phase)
        callbacks = [*callbacks, resume]
    if first_epoch >= end_epoch:  # the run stopped after its last epoch (in evaluation): no epoch is left
        history = keras.callbacks.History()
        history.epoch, history.history = [], {}
        return history
    fix_keras_multi_worker_fit(model, strategy, data.train)
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if distribution is not None:
        log.info("model.fit: each batch split over %d devices", distribution.num_model_replicas)
    # even_batches: a no-op but under a multi-device keras.distribution, which needs equal shards.
    history = model.fit(even_batches(data.train(first_epoch, end_epoch)), steps_per_epoch=data.steps_per_epoch,
                        validation_data=even_batches(data.validation), initial_epoch=first_epoch,
                        epochs=end_epoch, callbacks=callbacks, verbose=cfg.verbose,
                        shuffle=False)  # each epoch's shuffle is in data.train, keyed by the epoch
    check_finite(history, Path(cfg.paths.output_dir))
    return history


def strategy_choice() -> str | None:
    """The `strategy=` option of this run, when Hydra ran it (not in `compose`d configs)."""
    try:
        return HydraConfig.get().runtime.choices.get("strategy")
    except ValueError:  # no Hydra run: a config composed in a test or notebook
        return None


def check_finite(history: keras.callbacks.History, output_dir: Path) -> None:
    """Stops the run when the training loss became NaN or infinite, saying what is kept."""
    losses = history.history.get("loss", [])
    if losses and not math.isfinite(losses[-1]):
        kept = output_dir / "checkpoints" / "last.keras"
        raise FloatingPointError(
            f"The training loss became {losses[-1]} in epoch {history.epoch[-1] + 1}. "
            + (f"The last good model is {kept}. " if kept.exists() else "No epoch finished with a finite loss. ")
            + "Lower optimizer.learning_rate, or check the data for extreme values."
        )


def summary(metrics: dict[str, float]) -> str:
    """The test metrics on one line: `test/accuracy 0.9773, test/loss 0.0712, ...`."""
    return ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in metrics.items() if name.startswith("test/"))
