"""One training run, start to finish: config -> strategy -> data -> model -> fit -> export -> reports."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.backbones import weights_fingerprint
from pipeline.callbacks import ResumeState, drop_history_from
from pipeline.checks import check_train_config
from pipeline.cli import progress_verbosity
from pipeline.distribute import (KERAS_DISTRIBUTIONS, barrier, check_backend, even_batches,
                                 fix_keras_multi_worker_fit, is_chief, saving_is_collective)
from pipeline.files import atomic_path, atomic_write_text
from pipeline.hparams import chosen_hparams, end_session, hydra_choices_and_overrides, start_session
from pipeline.reports import write_skipped_files
from pipeline.runs import (RunFolderBusy, folder_fingerprint, lock_folder, mark_finished, mark_unfinished,
                           release_folder, set_aside)

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
    check_train_config(cfg)  # cheap; the train app has run it already, before importing TensorFlow
    backend = keras.backend.backend()
    check_backend(cfg.strategy._target_, strategy_choice())
    if backend == "jax":
        keras.distribution.set_distribution(None)  # a previous sweep job's data_parallel
        try:
            tf.config.set_visible_devices([], "GPU")  # TensorFlow only reads data: the GPUs are JAX's
        except RuntimeError:  # TensorFlow's runtime already started (an earlier job in this process)
            pass
    # First: multi-worker, multi-process and logical-CPU set-ups need a fresh runtime.
    strategy = start_strategy(cfg.strategy)
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
    else:
        lock_folder(cfg.paths.output_dir)  # no second run may write here while this one lives
        if (Path(cfg.paths.output_dir) / "metrics.json").exists():  # a finished run is never continued:
            start_in(Path(cfg.paths.output_dir), continuing=False)  # set aside before anything can fail
    task = instantiate(cfg.task)  # also builds the backbone and scans the dataset

    with strategy.scope():
        model = task.build_model()
        model.compile(optimizer=instantiate(cfg.optimizer, _convert_="all"), loss=task.loss,
                      metrics=task.metrics(), jit_compile=cfg.jit_compile)
    resume_dir = claim_resume_state(cfg, task, model, chief) if cfg.resume else None
    if chief and resume_dir is None:
        start_in(Path(cfg.paths.output_dir), continuing=False)
    output_dir = Path(cfg.paths.output_dir)  # the interrupted run's folder when continuing it
    tensorboard_dir = output_dir / "tensorboard"
    if chief:  # HParams lists the run from now on; cli.py ends the session of a failed run
        start_session(tensorboard_dir, chosen_hparams(cfg, *hydra_choices_and_overrides()))
    if chief:
        data = task.datasets(cfg.batch_size)  # transfer: runs the frozen base once per uncached image
    barrier(strategy, "features cached")
    if not chief:
        data = task.datasets(cfg.batch_size)  # the chief has cached every feature: reads only
    data.skipped = [*getattr(task.dataset, "skipped", []), *data.skipped]  # scanning skips FIFOs, pixel bombs
    write_skipped_files(output_dir, data.skipped)

    callbacks = [c for c in instantiate(cfg.callbacks, _convert_="all").values() if c is not None]
    history = fit(model, data, strategy, callbacks, cfg, chief, phase="head", first_epoch=0,
                  end_epoch=cfg.epochs, resume_dir=resume_dir)
    if task.fine_tune_epochs:  # transfer: unfreeze the top of the base and train on images
        with strategy.scope():
            model = task.fine_tune_model(model)
            optimizer = instantiate(cfg.optimizer, learning_rate=task.fine_tune_learning_rate, _convert_="all")
            model.compile(optimizer=optimizer, loss=task.loss, metrics=task.metrics(),
                          jit_compile=cfg.jit_compile)
        data = task.image_datasets(cfg.batch_size)
        data.skipped = [*getattr(task.dataset, "skipped", []), *data.skipped]
        history = fit(model, data, strategy, callbacks, cfg, chief, phase="fine_tune",
                      first_epoch=cfg.epochs, end_epoch=cfg.epochs + task.fine_tune_epochs,
                      resume_dir=resume_dir)

    if not chief:
        if saving_is_collective():  # the chief's save below waits for this one
            with atomic_path(output_dir / "model.keras") as path:
                task.export_model(model).save(path)
        shutil.rmtree(output_dir, ignore_errors=True)
        return {}
    with atomic_path(output_dir / "model.keras") as path:
        task.export_model(model).save(path)
    atomic_write_text(output_dir / "class_names.json", json.dumps(task.dataset.class_names))  # output order
    test = data.splits["test"]  # the images export checks its files on
    test_paths = getattr(test, "image_paths", None) or task.dataset.absolute(test.relative_paths)
    atomic_write_text(output_dir / "test_images.txt", "".join(f"{path}\n" for path in test_paths))
    if cfg.export.formats:  # before the reports: a run whose export fails has no metrics.json
        from pipeline.export.run import export_run

        export_run(output_dir, list(cfg.export.formats), image_size=list(cfg.image_size))
    # Reports; metrics.json is written last of all, so a run folder that has it is a finished run.
    metrics = task.evaluate(model, data, output_dir, tensorboard_dir, step=history.epoch[-1] + 1
                            if history.epoch else cfg.epochs)
    metrics = {**metrics, "backend": backend}  # the reports wrote it into metrics.json with the metrics
    end_session(tensorboard_dir, "success")
    mark_finished(output_dir)
    if resume_dir is not None and chief:
        release_folder(resume_dir)
        shutil.rmtree(resume_dir, ignore_errors=True)  # finished: nothing to resume
    log.info("%s. Reports, model.keras and TensorBoard logs are in %s", summary(metrics), output_dir)
    return metrics


def start_strategy(config: DictConfig):
    """Instantiates the `strategy` group (a `tf.distribute` strategy, or a `keras.distribution` one
    under JAX); a failure names the strategy's keys a user can set.

    Args:
        config: `cfg.strategy`.
    """
    try:
        return instantiate(config)
    except Exception as error:
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        keys = [(f"strategy.{key}", value) for key, value in _leaves(config) if not key.endswith("_target_")]
        settings = " ".join(f"{key}={value!r}" for key, value in keys) or "(none)"
        example = f"e.g. {keys[0][0]}=VALUE, " if keys else ""
        raise RuntimeError(
            f"Could not start the strategy {config._target_}: {cause} Its settings: {settings}. Set them on "
            f"the command line ({example}see conf/strategy/), or choose another strategy=... (strategy=default "
            "runs on this machine's devices)."
        ) from error


def _leaves(config: DictConfig, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every non-dict value in `config`."""
    leaves = []
    for key, value in config.items():
        if isinstance(value, DictConfig):
            leaves += _leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def fit(model, data, strategy, callbacks, cfg, chief: bool, phase: str, first_epoch: int,
        end_epoch: int, resume_dir: Path | None = None) -> keras.callbacks.History:
    """`model.fit` from where an interrupted run of the same command stopped, if it did.

    Args:
        model: the compiled model.
        data: the task's datasets.
        strategy: the distribution strategy the model was built in.
        callbacks: the configured Keras callbacks.
        cfg: the run config (`epochs`, `paths.output_dir`, `verbose`).
        chief: whether this worker saves the resume state.
        phase: "head" or "fine_tune": each phase resumes on its own.
        first_epoch: the phase's first epoch.
        end_epoch: one past its last epoch.
        resume_dir: this run's resume state (`claim_resume_state`); None: not resumable.
    """
    if resume_dir is not None:
        resume = ResumeState(resume_dir / phase, save=chief, callbacks=callbacks)
        with strategy.scope():
            restored = resume.restore(model)
        first_epoch = end_epoch if resume.stopped else max(first_epoch, restored)
        if restored and first_epoch >= end_epoch:
            log.info("Every %s epoch had finished, or a callback had stopped training (%s): evaluating",
                     phase, resume.directory)
        elif restored:
            log.info("Resuming %s training at epoch %d from %s", phase, restored + 1, resume.directory)
        if not chief and saving_is_collective():  # saves with the chief, into its own temporary folder
            resume = ResumeState(Path(cfg.paths.output_dir) / "resume" / phase, callbacks=callbacks)
        callbacks = [*callbacks, resume]  # last: it gives the callbacks before it their state back
    if first_epoch >= end_epoch:  # the run stopped after its last epoch (in evaluation): no epoch is left
        # The callbacks still begin and end training, as in a fit without epochs: EarlyStopping gets its
        # state back from ResumeState and restores its best weights, as the uninterrupted run did.
        callback_list = keras.callbacks.CallbackList(callbacks, model=model)
        callback_list.on_train_begin()
        callback_list.on_train_end()
        history = keras.callbacks.History()
        history.epoch, history.history = [], {}
        return history
    if chief:
        for callback in callbacks:  # epochs about to be trained (again) must not be listed twice
            if isinstance(callback, keras.callbacks.CSVLogger):
                drop_history_from(callback.filename, first_epoch)
    fix_keras_multi_worker_fit(model, strategy, data.train)
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if distribution is not None:
        log.info("model.fit: each batch split over %d devices", distribution.num_model_replicas)
    # even_batches: a no-op but under a multi-device keras.distribution, which needs equal shards.
    history = model.fit(even_batches(data.train(first_epoch, end_epoch)), steps_per_epoch=data.steps_per_epoch,
                        validation_data=even_batches(data.validation), initial_epoch=first_epoch,
                        epochs=end_epoch, callbacks=callbacks, verbose=progress_verbosity(cfg.verbose),
                        shuffle=False)  # each epoch's shuffle is in data.train, keyed by the epoch
    check_finite(history, Path(cfg.paths.output_dir))
    return history


def claim_resume_state(cfg: DictConfig, task, model: keras.Model, chief: bool) -> Path | None:
    """This run's resume folder, checked against the run that saved it; continues in that run's folder.

    The folder (`paths.resume_dir`) is found by the command's overrides; `run.json` in it records a
    fingerprint of everything that determines training (the composed config, the data set's files,
    the initial weights) and the run folder of the run that saved it. A state saved by a run with
    another fingerprint is discarded with one line saying so; a matching one is continued in its own
    run folder (`paths.output_dir` is pointed there), so its history and TensorBoard stay one.

    Args:
        cfg: the run config; `paths.output_dir` is changed when an interrupted run is continued.
        task: the instantiated task (its dataset and, for transfer, its feature extractor).
        model: the freshly built model (its initial weights are part of the fingerprint).
        chief: whether this worker owns the resume state (the others only read it).

    Returns:
        The resume folder, or None when this run cannot resume (another run of the same command owns it).
    """
    resume_dir = Path(cfg.paths.resume_dir)
    own = Path(cfg.paths.output_dir).absolute()
    fingerprint = run_fingerprint(cfg, task, model)
    if chief:
        try:
            resume_dir.mkdir(parents=True, exist_ok=True)
            lock_folder(resume_dir)
        except RunFolderBusy:
            log.warning("Another run of the same command is saving its resume state in %s; this run "
                        "starts at epoch 1 and cannot be resumed.", resume_dir)
            return None
        except OSError as error:
            raise OSError(error.errno, f"Cannot save the resume state in {resume_dir}: {error.strerror or error}. "
                          "Run with resume=false, or set paths.cache_dir (or paths.resume_dir) to a writable "
                          "folder") from error
    record = read_json(resume_dir / "run.json")
    saved = any(resume_dir.glob("*/epoch-*.weights.h5"))
    target = own
    if saved and record is not None:
        previous = Path(record.get("output_dir", own))
        if record.get("fingerprint") != fingerprint:
            log.warning("Discarding the saved state of an interrupted run (%s): the config, the data set's "
                        "files or the initial weights changed since; training starts at epoch 1.", previous)
            saved = False
        elif (previous / "metrics.json").exists():
            saved = False  # killed after it finished, before it removed its state
        elif previous != own and previous.is_dir() and chief:
            lock_folder(previous)  # refuses if the interrupted run is being continued already
            target = previous
    elif saved:
        log.warning("Discarding a resume state in %s that records no run; training starts at epoch 1.", resume_dir)
        saved = False
    if chief:
        if not saved:
            for phase in resume_dir.iterdir():
                if phase.is_dir():
                    shutil.rmtree(phase, ignore_errors=True)
        if target != own:
            continue_in(target, own)
            cfg.paths.output_dir = str(target)  # every path below (callbacks, reports) follows it
        start_in(target, continuing=saved)
        atomic_write_text(resume_dir / "run.json", json.dumps({"fingerprint": fingerprint,
                                                                "output_dir": str(target)}, indent=2))
    return resume_dir


def start_in(folder: Path, continuing: bool) -> None:
    """Readies a run folder: an older run's outputs are set aside (unless continued), then it is marked unfinished."""
    if continuing:
        (folder / "error.txt").unlink(missing_ok=True)  # the failure of the run being continued
    else:
        moved = set_aside(folder)
        if moved is not None:
            log.warning("%s held another run's outputs; they were moved to %s.", folder, moved)
    mark_unfinished(folder, " ".join(sys.argv))


def continue_in(previous: Path, own: Path) -> None:
    """Points this run at the interrupted run's folder, with a note and a copy of the log there."""
    log.info("Continuing the interrupted run in %s (this command's folder %s keeps only its config and a "
             "note)", previous, own)
    own.mkdir(parents=True, exist_ok=True)
    atomic_write_text(own / "continued_in.txt", f"This run continued the interrupted run in {previous}; "
                      "its reports, history and checkpoints are there.\n")
    handler = logging.FileHandler(previous / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)


def run_fingerprint(cfg: DictConfig, task, model: keras.Model) -> str:
    """sha256 over what determines training: composed config, data set files, initial weights.

    The run folder and resume folder are left out of the config (a rerun gets a new run folder), and
    so are `verbose` and `resume`, which change nothing that is trained.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    text = json.dumps({key: value for key, value in config.items() if key not in ("verbose", "resume")},
                      sort_keys=True, default=str)
    for path in (str(cfg.paths.output_dir), str(cfg.paths.resume_dir)):
        text = text.replace(path, "<run>")
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape"))
    digest.update(folder_fingerprint(getattr(task.dataset, "root", None)).encode())
    digest.update(weights_fingerprint(model).encode())
    extractor = getattr(task, "extractor", None)
    if extractor is not None:  # transfer: the frozen base lives beside the head
        digest.update(weights_fingerprint(extractor).encode())
    return digest.hexdigest()


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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
    """The test metrics on one line: `test/accuracy 0.9773, test/loss 0.0712, ...` (the validation
    metrics when the run has no test split)."""
    split = "test/" if any(name.startswith("test/") for name in metrics) else "validation/"
    return ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in metrics.items() if name.startswith(split))
