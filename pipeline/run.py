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
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.callbacks import ResumeState
from pipeline.distribute import barrier, fix_keras_multi_worker_fit, is_chief
from pipeline.files import atomic_path, atomic_write_text
from pipeline.hparams import chosen_hparams, end_session, hydra_choices_and_overrides, start_session
from pipeline.reports import write_skipped_files
from pipeline.schema import check_run_config

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
    check_run_config(cfg)  # ranges (batch_size >= 1, ...), before anything is built
    strategy = instantiate(cfg.strategy)  # first: multi-worker and logical-CPU set-ups need a fresh runtime
    keras.backend.clear_session()  # sweeps in one process: free the previous job's models
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(instantiate(cfg.precision))
    chief = is_chief(strategy)
    if not chief:  # every path below follows paths.output_dir
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="worker-")
    output_dir = Path(cfg.paths.output_dir)
    tensorboard_dir = output_dir / "tensorboard"
    if chief:  # HParams lists the run from now on; cli.py ends the session of a failed run
        start_session(tensorboard_dir, chosen_hparams(cfg, *hydra_choices_and_overrides()))
    task = instantiate(cfg.task)  # also builds the backbone and scans the dataset

    with strategy.scope():
        model = task.build_model()
        model.compile(optimizer=instantiate(cfg.optimizer, _convert_="all"), loss=task.loss,
                      metrics=task.metrics(), jit_compile=cfg.jit_compile)
    if chief:
        data = task.datasets(cfg.batch_size)  # transfer: runs the frozen base once per uncached image
    barrier(strategy)
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
        shutil.rmtree(output_dir, ignore_errors=True)
        return {}
    with atomic_path(output_dir / "model.keras") as path:
        task.export_model(model).save(path)
    atomic_write_text(output_dir / "class_names.json", json.dumps(task.dataset.class_names))  # output order
    # Reports; metrics.json is written last of all, so a run folder that has it is a finished run.
    metrics = task.evaluate(model, data, output_dir, tensorboard_dir, step=history.epoch[-1] + 1
                            if history.epoch else cfg.epochs)
    end_session(tensorboard_dir, "success")
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
        if first_epoch:
            log.info("Resuming %s training at epoch %d from %s", phase, first_epoch + 1, resume.directory)
        callbacks = [*callbacks, resume]
    fix_keras_multi_worker_fit(model, strategy, data.train)
    history = model.fit(data.train(first_epoch, end_epoch), steps_per_epoch=data.steps_per_epoch,
                        validation_data=data.validation, initial_epoch=first_epoch, epochs=end_epoch,
                        callbacks=callbacks, verbose=cfg.verbose,
                        shuffle=False)  # each epoch's shuffle is in data.train, keyed by the epoch
    check_finite(history, Path(cfg.paths.output_dir))
    return history


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
