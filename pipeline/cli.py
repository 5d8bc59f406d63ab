"""What the command-line scripts share: a failed run is one clear line, its traceback in error.txt."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from pipeline.hparams import end_session_if_started
from pipeline.sweeps import JobFailed


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
        end_session_if_started(output_dir, "failure")  # TensorBoard's HParams shows the run as failed
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error_file = Path(output_dir) / "error.txt"
        try:
            error_file.write_text(traceback.format_exc())
        except OSError:  # the disk may be the problem
            error_file = "error.txt: could not be written"
        log.error("%s: %s\n(traceback in %s%s)", type(error).__name__, error, error_file, note)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(f"{type(error).__name__}: {error} (traceback in {error_file})") from error
        sys.exit(1)
