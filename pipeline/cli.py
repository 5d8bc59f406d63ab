"""What the command-line scripts share: a quiet TensorFlow start-up, and a failed run as one clear line
(its traceback in error.txt)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import OmegaConf

from pipeline.sweeps import JobFailed


CONF = Path(__file__).resolve().parents[1] / "conf"

# `${config_options:backbone}`: the options of a config group, for the --help of predict.py and
# annotate.py, which list only the groups they use (Hydra's default lists every group in conf/).
OmegaConf.register_new_resolver(
    "config_options", lambda group: ", ".join(sorted(path.stem for path in (CONF / group).glob("*.yaml"))),
    replace=True,
)


@contextlib.contextmanager
def one_line_errors(output_dir: str, log: logging.Logger, note: str = "") -> Iterator[None]:
    """Turns an exception into one log line and exit code 1, keeping the traceback in error.txt.

    `HYDRA_FULL_ERROR=1` re-raises instead, for the whole traceback. In a multirun the failure is
    raised as `JobFailed`, so a launcher that runs jobs in one process records it and goes on.

    Args:
        output_dir: the run folder, where error.txt goes.
        log: the script's logger.
        note: added to the message, e.g. what the missing files mean.
    """
    try:
        yield
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error_file = Path(output_dir) / "error.txt"
        try:
            error_file.write_text(traceback.format_exc())
        except OSError:  # the disk may be the problem
            error_file = "error.txt: could not be written"
        shown = error
        # Hydra wraps what a constructor raised in "Error in call to target ...: ValueError('...')";
        # our constructors' messages already say what to set, so show them as they were raised.
        while isinstance(shown, InstantiationException) and isinstance(shown.__cause__, (ValueError, OSError,
                                                                                          RuntimeError)):
            shown = shown.__cause__
        log.error("%s: %s\n(traceback in %s%s)", type(shown).__name__, shown, error_file, note)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(f"{type(shown).__name__}: {shown} (traceback in {error_file})") from error
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
