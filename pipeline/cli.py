"""What the command-line scripts share: a quiet TensorFlow start-up, and a failed run as one clear line
(its traceback in error.txt)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import OmegaConf

from pipeline.hparams import end_session_if_started
from pipeline.sweeps import JobFailed


def describe_error(error: BaseException) -> str:
    """`Type: message` of the error a user has to act on.

    Hydra wraps an error raised inside an instantiated constructor in an InstantiationException whose
    text is the original's repr (a list's line breaks as literal `\\n`); the original is shown instead,
    with the config key whose constructor raised it.
    """
    key = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:  # nested: a task's backbone
        if "full_key: " in str(error):
            key = str(error).rsplit("full_key: ", 1)[1].strip()
        error = error.__cause__
    return f"{type(error).__name__}: {error}" + (f" (in {key})" if key else "")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit, `kill`), raised where the run is, so it stops like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def interrupted_message(output_dir: str | Path, signal_name: str) -> str:
    """One line: what stopped the run, what is kept, how to continue."""
    how = "Ctrl-C" if signal_name == "SIGINT" else signal_name
    kept = ["every finished cache entry and converted weight file"]
    checkpoint = Path(output_dir) / "checkpoints" / "last.keras"
    if checkpoint.exists():
        kept.append(f"{checkpoint} and the state of the last finished epoch")
    return (f"Interrupted by {how}. Kept: {'; '.join(kept)}. No metrics.json: the run did not finish; run "
            "the same command again to resume from the last finished epoch.")


@contextlib.contextmanager
def stop_in_one_line(output_dir: str, log: logging.Logger) -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the run with one line (what is kept, how to resume), not a traceback.

    The process then ends by the same signal, so its parent (a shell, the sweep launcher, a cluster
    scheduler) still sees how it ended: `$?` is 130 after Ctrl-C and 143 after SIGTERM.

    Args:
        output_dir: the run folder.
        log: the script's logger.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as interruption:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        number = signal.SIGTERM if isinstance(interruption, Terminated) else signal.SIGINT
        end_session_if_started(output_dir, "failure")  # TensorBoard's HParams: it did not finish
        log.error(interrupted_message(output_dir, signal.Signals(number).name))
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not main_thread:
            raise
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        raise  # not reached: the default action of the signal ends the process
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# `${config_options:backbone}`: the options of a config group, for the --help of predict.py and
# annotate.py, which list only the groups they use (Hydra's default lists every group in conf/).
OmegaConf.register_new_resolver(
    "config_options",
    lambda group: ", ".join(sorted(path.stem for path in (Path(_config_dir()) / group).glob("*.yaml"))),
    replace=True,
)


def _config_dir() -> str:
    from pipeline.apps import CONFIG_PATH  # the checkout's conf/ or the installed pipeline/conf

    return CONFIG_PATH


@contextlib.contextmanager
def one_line_errors(output_dir: str, log: logging.Logger, note: str = "") -> Iterator[None]:
    """Turns an exception into one log line and exit code 1, keeping the traceback in error.txt.

    Ctrl-C and SIGTERM are one line too (`stop_in_one_line`).

    `HYDRA_FULL_ERROR=1` re-raises instead, for the whole traceback. In a multirun the failure is
    raised as `JobFailed`, so a launcher that runs jobs in one process records it and goes on.

    Args:
        output_dir: the run folder, where error.txt goes.
        log: the script's logger.
        note: added to the message, e.g. what the missing files mean.
    """
    try:
        with stop_in_one_line(output_dir, log):
            yield
    except Exception as error:
        end_session_if_started(output_dir, "failure")  # TensorBoard's HParams shows the run as failed
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error_file = Path(output_dir) / "error.txt"
        try:
            error_file.write_text(traceback.format_exc())
        except OSError:  # the disk may be the problem
            error_file = "error.txt: could not be written"
        message = describe_error(error)
        log.error("%s\n(traceback in %s%s)", message, error_file, note)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(f"{message} (traceback in {error_file})") from error
        sys.exit(1)


def quiet_tensorflow_start() -> None:
    """Imports TensorFlow and finds its devices without printing its C++ start-up lines.

    Since TensorFlow 2.16 the absl lines (`All log messages before absl::InitializeLog()`, cudart's
    "Could not find cuda drivers", `failed call to cuInit ... (303)`) are written before
    `TF_CPP_MIN_LOG_LEVEL` is read, so setting it hides only TensorFlow's own lines (oneDNN, CPU
    features). The process's stderr is therefore pointed at /dev/null while TensorFlow is imported
    and initialises its platforms, and restored after; an import error still raises as usual.
    `TF_CPP_MIN_LOG_LEVEL=0` (or 1) in the environment keeps every line, for debugging a GPU set-up.
    Without TensorFlow installed (JAX-only machines) this does nothing.
    """
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if level in ("0", "1") or importlib.util.find_spec("tensorflow") is None or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()  # platform initialisation: where cuInit reports its failure
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def progress_verbosity(verbose: int | str) -> int | str:
    """`model.fit`'s `verbose`: "auto" is a progress bar on a terminal and one plain line per epoch
    otherwise, so a log file gets no carriage returns or escape codes."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose
