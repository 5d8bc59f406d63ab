"""One training run, start to finish: config -> strategy -> data -> model -> fit -> reports -> export."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.files import atomic_path
from pipeline.reports import write_hparams, write_skipped_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains the configured task and writes reports and `model.keras` into the run folder.

    Args:
        cfg: the composed `conf/train.yaml`.

    Returns:
        The metrics also written to `metrics.json`.
    """
    output_dir = Path(cfg.paths.output_dir)
    tensorboard_dir = output_dir / "tensorboard"
    keras.backend.clear_session()  # sweeps in one process: free the previous job's models
    keras.utils.set_random_seed(cfg.seed)
    strategy = instantiate(cfg.strategy)
    task = instantiate(cfg.task)  # also builds the backbone and scans the dataset

    with strategy.scope():
        model = task.build_model()
        model.compile(optimizer=instantiate(cfg.optimizer), loss=task.loss, metrics=task.metrics())
    data = task.datasets(cfg.batch_size)  # transfer: runs the frozen base once per uncached image
    write_skipped_files(output_dir, data.skipped)

    callbacks = [callback for callback in instantiate(cfg.callbacks).values() if callback is not None]
    model.fit(data.train, validation_data=data.validation, epochs=cfg.epochs, callbacks=callbacks,
              verbose=cfg.verbose, shuffle=False)  # tf.data already shuffles the training split

    if task.fine_tune_epochs:  # transfer: unfreeze the top of the base and train on images
        with strategy.scope():
            model = task.fine_tune_model(model)
            model.compile(optimizer=instantiate(cfg.optimizer, learning_rate=task.fine_tune_learning_rate),
                          loss=task.loss, metrics=task.metrics())
        data = task.image_datasets(cfg.batch_size)
        model.fit(data.train, validation_data=data.validation, initial_epoch=cfg.epochs,
                  epochs=cfg.epochs + task.fine_tune_epochs, callbacks=callbacks, verbose=cfg.verbose,
                  shuffle=False)

    metrics = task.evaluate(model, data, output_dir, tensorboard_dir, step=cfg.epochs)  # reports too
    with atomic_path(output_dir / "model.keras") as path:
        task.export_model(model).save(path)
    write_hparams(tensorboard_dir, OmegaConf.to_container(cfg, resolve=True), metrics)
    log.info("%s. Reports, model.keras and TensorBoard logs are in %s", summary(metrics), output_dir)
    return metrics


def summary(metrics: dict[str, float]) -> str:
    """The test metrics on one line: `test/accuracy 0.9773, test/loss 0.0712, ...`."""
    return ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in metrics.items() if name.startswith("test/"))
