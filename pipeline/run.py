"""One training run, start to finish: config -> strategy -> data -> model -> fit -> reports -> export."""

from __future__ import annotations

import logging
import math
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
        model.compile(optimizer=instantiate(cfg.optimizer, _convert_="all"), loss=task.loss, metrics=task.metrics())
    data = task.datasets(cfg.batch_size)  # transfer: runs the frozen base once per uncached image
    write_skipped_files(output_dir, data.skipped)

    callbacks = [callback for callback in instantiate(cfg.callbacks, _convert_="all").values() if callback is not None]
    history = model.fit(data.train, validation_data=data.validation, epochs=cfg.epochs,
                        callbacks=callbacks, verbose=cfg.verbose, shuffle=False)  # tf.data shuffles
    check_finite(history, output_dir)

    if task.fine_tune_epochs:  # transfer: unfreeze the top of the base and train on images
        with strategy.scope():
            model = task.fine_tune_model(model)
            model.compile(optimizer=instantiate(cfg.optimizer, learning_rate=task.fine_tune_learning_rate,
                                                         _convert_="all"),
                          loss=task.loss, metrics=task.metrics())
        data = task.image_datasets(cfg.batch_size)
        history = model.fit(data.train, validation_data=data.validation, initial_epoch=cfg.epochs,
                            epochs=cfg.epochs + task.fine_tune_epochs, callbacks=callbacks,
                            verbose=cfg.verbose, shuffle=False)
        check_finite(history, output_dir)

    with atomic_path(output_dir / "model.keras") as path:
        task.export_model(model).save(path)
    # Reports; metrics.json is written last of all, so a run folder that has it is a finished run.
    metrics = task.evaluate(model, data, output_dir, tensorboard_dir, step=cfg.epochs)
    write_hparams(tensorboard_dir, OmegaConf.to_container(cfg, resolve=True), metrics)
    log.info("%s. Reports, model.keras and TensorBoard logs are in %s", summary(metrics), output_dir)
    return metrics


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
