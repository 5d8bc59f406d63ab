"""Hydra launcher: every job of a sweep in a fresh process; finished jobs are skipped, so a re-run resumes.

Why a new process per job: TensorFlow never gives GPU memory back inside a process, and joblib's loky
launcher reuses its worker processes across jobs. So each job here is the same script run again with
the job's overrides (`python train.py <overrides> hydra.run.dir=<sweep dir>/<job>`), a single run that
writes into its folder of the sweep. This process imports no TensorFlow; it only waits.

Selected by conf/hydra/launcher/process_per_job.yaml. Hydra finds this module because `hydra_plugins`
is a namespace package: from the repository root, or installed with the project.
"""

# No `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where @dataclass cannot resolve string annotations.

import ctypes
import functools
import logging
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.runs import folder_owner, set_aside
from pipeline.sweeps import (SUMMARY_MARKDOWN, JobFailed, error_line, keras_backend_of_jobs, read_job,
                             split_override, sweep_id, write_summary)

log = logging.getLogger(__name__)

# conf/hydra/default.yaml names a sweep's folder `multirun/${sweep_id:...}` (pipeline/sweeps.py). It is
# registered here because Hydra imports every plugin module before it composes a config: in each script
# of the project (train.py, predict.py, annotate.py) and in the workers of other launchers. Cached, so
# every job's config keeps the value of the whole command (Hydra copies the cache into each job's config)
# instead of computing one from the job's own overrides.
OmegaConf.register_new_resolver("sweep_id", sweep_id, use_cache=True, replace=True)
# `outputs/<date>/<time>-${pid:}`: two runs started in the same second get two folders.
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)

# The launcher sets these for every job; a user's value of them is not passed on to the jobs.
LAUNCHER_KEYS = {"hydra.mode", "hydra.run.dir", "hydra.job.num", "hydra.job.id"}


@dataclass
class PlannedJob:
    number: int
    overrides: list[str]
    folder: Path
    optimized_metric: str | None  # the metrics.json key returned to the sweeper (Optuna)
    config: dict | None = None  # the job's whole composed config (without `hydra`), interpolations as written


class ProcessPerJobLauncher(Launcher):
    """Runs each job as `python <this script> <the job's overrides>` in a new process.

    Args:
        n_jobs: how many jobs run at once (`hydra.launcher.n_jobs`).
    """

    def __init__(self, n_jobs: int = 1) -> None:
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise ValueError(f"hydra.launcher.n_jobs must be a whole number >= 1; got {n_jobs!r}.")
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.sweep_dir: Path | None = None
        self.announced = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # No task_function: each job runs the script anew instead of calling it in this process.
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Runs one batch of jobs (a grid sweeper sends all of them, Optuna a few at a time)."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        self.sweep_dir = sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not self.announced:
            log.info("Sweep folder: %s (run the same command again to resume it; jobs that finished are "
                     "skipped). Each job runs in its own process, %d at a time.", sweep_dir, self.n_jobs)
            self.announced = True
        jobs = [self.plan(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        pool = ThreadPoolExecutor(self.n_jobs)  # threads only wait for the job processes
        try:
            returns = list(pool.map(self.run, jobs))
        finally:
            pool.shutdown(cancel_futures=True)  # after Ctrl-C, start no further job

        direction = OmegaConf.select(self.config, "hydra.sweeper.direction")  # Optuna's, when it is the sweeper
        direction = getattr(direction, "name", direction)
        jobs = write_summary(sweep_dir, self.config.optimized_metric,
                             direction if direction in ("maximize", "minimize") else "auto")
        log.info("Summary of the %d jobs so far, best first: %s", len(jobs), sweep_dir / SUMMARY_MARKDOWN)
        return returns

    def plan(self, number: int, overrides: list[str]) -> PlannedJob:
        """The job's folder and metric, from its composed config (as Hydra's own launchers compose it)."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = number
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the folder names
        try:
            folder = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        finally:
            HydraConfig.instance().cfg = previous
        with open_dict(config):
            del config["hydra"]
        return PlannedJob(number, overrides, folder.absolute(), OmegaConf.select(config, "optimized_metric"),
                          OmegaConf.to_container(config, resolve=False))

    def run(self, job: PlannedJob) -> JobReturn:
        """Runs one job in a new process, or reads back its metrics if it finished before."""
        owner = folder_owner(job.folder)
        if owner is not None:  # e.g. a job of a killed launcher that has not ended yet
            log.error("#%d not started: %s is in use by process %s", job.number, job.folder, owner)
            return job_return(job, error=JobFailed(
                f"Job #{job.number} of the sweep was not started: its folder {job.folder} is in use by process "
                f"{owner}. Wait for that process to end (or end it), then run the same command again."))
        previous = read_job(job.folder)
        if previous and previous.status == "finished":
            # The backend is not in the config (KERAS_BACKEND): a job of the other backend is run again.
            backend, before = keras_backend_of_jobs(), previous.metrics.get("backend")
            if same_config(job) and before in (None, backend):
                log.info("#%d skipped: finished before in %s", job.number, job.folder)
                return job_return(job, previous.metrics)
            moved = set_aside(job.folder)
            if before not in (None, backend):
                log.warning("#%d: %s holds a job finished under the %s backend, and this sweep runs under %s; "
                            "it is run again, the old outputs are in %s", job.number, job.folder, before, backend,
                            moved)
            else:
                log.warning("#%d: %s holds a finished job with another config (overrides %s, or an edited "
                            "conf/); it is run again, the old outputs are in %s", job.number, job.folder,
                            " ".join(previous.overrides), moved)
        for stale in ("metrics.json", "error.txt"):  # a failed re-run must not look finished
            (job.folder / stale).unlink(missing_ok=True)

        hydra_overrides = [override for override in self.config.hydra.overrides.hydra
                           if split_override(override)[0].lstrip("+~") not in LAUNCHER_KEYS]
        command = [sys.executable, os.path.abspath(sys.argv[0]), *hydra_overrides, *job.overrides,
                   "hydra.mode=RUN", f"hydra.run.dir={quote(str(job.folder))}",
                   f"hydra.job.num={job.number}", f"hydra.job.id={job.number}"]
        process = subprocess.Popen(command, preexec_fn=functools.partial(die_with, os.getpid()))
        log.info("#%d started in process %d: %s", job.number, process.pid, " ".join(filter_overrides(job.overrides)))
        exit_code = process.wait()

        finished = read_job(job.folder)
        if finished and finished.status == "finished":
            log.info("#%d finished", job.number)
            return job_return(job, finished.metrics)
        if exit_code == 0:  # a script that writes no metrics.json (predict.py): done, but never skipped
            log.info("#%d finished without metrics.json", job.number)
            return job_return(job, {})
        if exit_code == -signal.SIGINT:  # Ctrl-C: left incomplete, like a killed job; a re-run runs it
            log.warning("#%d interrupted", job.number)
            return job_return(job, error=JobFailed(f"Job #{job.number} of the sweep was interrupted."))
        error_file = job.folder / "error.txt"
        if not error_file.exists():  # killed (out of memory?) or stopped before the run began
            job.folder.mkdir(parents=True, exist_ok=True)
            error_file.write_text(f"RuntimeError: the job's process {describe_exit(exit_code)} before it "
                                  "wrote metrics.json or error.txt; its log is in the sweep's output.\n")
        error = error_line(error_file.read_text(errors="replace"))
        log.error("#%d failed: %s (details in %s)", job.number, error, error_file)
        return job_return(job, error=JobFailed(
            f"Job #{job.number} of the sweep failed: {error} (details in {error_file}). The other jobs went "
            f"on: see {self.sweep_dir / SUMMARY_MARKDOWN}; run the same command again to retry it."))


def same_config(job: PlannedJob) -> bool:
    """Whether the finished run in the job's folder ran exactly the config this job would run now.

    Compares the whole composed config (what Hydra saved in `.hydra/config.yaml`), not only the
    overrides: an edit to a file in conf/ changes what a job trains, so it must run again.
    """
    try:
        saved = OmegaConf.to_container(OmegaConf.load(job.folder / ".hydra" / "config.yaml"), resolve=False)
    except Exception:  # missing or unreadable: it cannot be shown to be the same
        return False
    return job.config is not None and saved == job.config


def die_with(launcher: int) -> None:
    """Runs in the job's process before it starts: it gets SIGTERM when the launcher dies (Linux).

    So killing the launcher (SIGKILL, SIGTERM, out of memory) never leaves a job training on its own,
    holding GPU memory, while a rerun of the sweep starts the same job again.

    Args:
        launcher: the launcher's process id, to catch a launcher that died before this call.
    """
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:
        os._exit(1)


def job_return(job: PlannedJob, metrics: dict | None = None, error: Exception | None = None) -> JobReturn:
    """What Hydra's sweepers expect back: the job's optimized metric, or the error that failed it."""
    result = JobReturn(overrides=job.overrides, working_dir=os.getcwd(),
                       status=JobStatus.FAILED if error else JobStatus.COMPLETED)
    result.return_value = error if error else metrics.get(job.optimized_metric) if job.optimized_metric else None
    return result


def describe_exit(exit_code: int) -> str:
    if exit_code == -signal.SIGKILL:
        return "was killed by SIGKILL (out of memory?)"
    if exit_code < 0:
        return f"was killed by {signal.Signals(-exit_code).name}"
    return f"exited with code {exit_code}"


def quote(value: str) -> str:
    """A Hydra override value that stays one string whatever characters a path has (`,`, `=`, `'`, ...).

    In Hydra's quoted strings a backslash is literal unless it comes before a quote: only those are doubled.
    """
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"
