"""Sweep folders: a name that stays the same for the same command (so a re-run resumes), and the summary.

A job of a sweep is one run folder under the sweep folder. It is *finished* when it has `metrics.json`
(a run writes it last of all), *failed* when it has `error.txt` instead, and *incomplete* when it has
neither (killed, or still running). `python -m pipeline.sweeps SWEEP_DIR` rewrites the summary of a
sweep that another launcher (Submitit, Ray) ran.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from pipeline.files import atomic_write_text

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MARKDOWN = "sweep_summary.md"


def sweep_id(script: str, overrides: Iterable[str]) -> str:
    """`head-1a2b3c4d`: the `sweep=` recipe's name (or `sweep`) and a hash of the command.

    conf/hydra/default.yaml names the sweep folder
    `multirun/${sweep_id:${hydra.job.name},${hydra.overrides.task}}`, so the same command finds the
    same folder again and resumes it. The launcher plugin
    (hydra_plugins/pipeline_launcher) registers it as a *cached* resolver: Hydra copies the cache into
    every job's config, so each job sees the value of the whole command, not one of its own overrides.

    Args:
        script: the job's name (`train`, `predict`), so that two scripts' sweeps never share a folder.
        overrides: the command line's overrides in order (`hydra.overrides.task`), sweeps unexpanded.
    """
    if OmegaConf.is_config(overrides):  # as typed: an override such as `x=${hydra:runtime.cwd}` stays text
        overrides = OmegaConf.to_container(overrides, resolve=False)
    overrides = [str(override) for override in overrides]
    recipes = [value for key, value in map(split_override, overrides) if key.lstrip("+~") == "sweep"]
    recipe = re.sub(r"[^\w.-]+", "_", recipes[-1]) if recipes else "sweep"
    return f"{recipe}-{hashlib.sha256(chr(10).join([script, *overrides]).encode()).hexdigest()[:8]}"


class JobFailed(CompactHydraException):
    """A job of a sweep failed; the sweep went on. Hydra prints only this message, no traceback."""


def keras_backend_of_jobs() -> str:
    """The Keras backend a job started from this process will use, without importing Keras (seconds).

    Keras's own order: `KERAS_BACKEND`, else `"backend"` in `$KERAS_HOME/keras.json` (default
    `~/.keras`), else TensorFlow.
    """
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        backend = json.loads(Path(home, "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return backend if isinstance(backend, str) and backend else "tensorflow"


def split_override(override: str) -> tuple[str, str]:
    """`optimizer.learning_rate=0.001` -> (`optimizer.learning_rate`, `0.001`)."""
    key, _, value = override.partition("=")
    return key, value


@dataclass
class Job:
    """One job of a sweep, as its folder records it."""

    name: str  # the folder, relative to the sweep folder: Hydra's job number
    folder: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""  # the exception line of a failed job

    @property
    def status(self) -> str:
        return "finished" if self.metrics else "failed" if self.error else "incomplete"


def read_job(folder: str | Path) -> Job | None:
    """The job in `folder`, or None when it is not a job folder (no `.hydra/overrides.yaml`).

    Args:
        folder: a run folder of the sweep.
    """
    folder = Path(folder)
    overrides_file = folder / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return None
    job = Job(name=folder.name, folder=folder, overrides=[str(o) for o in OmegaConf.load(overrides_file)])
    if (folder / "metrics.json").is_file():
        job.metrics = read_metrics(folder / "metrics.json")
    if not job.metrics and (folder / "error.txt").is_file():
        job.error = error_line((folder / "error.txt").read_text(errors="replace")) or "failed"
    return job


def read_metrics(path: Path) -> dict[str, float]:
    """The metrics in `path`; empty (the job counts as unfinished, so a resume reruns it) if unreadable."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        log.warning("%s cannot be read (%s): that job counts as unfinished and a rerun of the sweep runs "
                    "it again.", path, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return {}
    if not isinstance(metrics, dict) or not metrics:
        log.warning("%s holds no metrics: that job counts as unfinished and a rerun of the sweep runs it "
                    "again.", path)
        return {}
    return metrics


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job folder under `sweep_dir`, in job-number order.

    Args:
        sweep_dir: the sweep folder (`hydra.sweep.dir`).
    """
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(path.parent.parent) for path in sweep_dir.glob("**/.hydra/overrides.yaml")]
    for job in jobs:
        job.name = job.folder.relative_to(sweep_dir).as_posix()
    return sorted(jobs, key=lambda job: [int(part) if part.isdigit() else part
                                         for part in re.split(r"(\d+)", job.name)])


def error_line(traceback_text: str) -> str:
    """The `ValueError: ...` line of a traceback (of the last exception when they are chained)."""
    lines = traceback_text.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    for line in lines[starts[-1] + 1 if starts else 0:]:
        if line.strip() and not line.startswith(" "):
            return line.strip()
    return lines[-1].strip() if lines else ""


def best_first(jobs: list[Job], metric: str, direction: str = "auto") -> list[Job]:
    """Finished jobs best first by `metric`, then finished ones without it, failed, incomplete.

    Args:
        jobs: the jobs of a sweep.
        metric: the key of `metrics.json` to rank by (`optimized_metric`).
        direction: `maximize`, `minimize`, or `auto`: minimize when the name ends in `loss`, as
            Keras's `mode="auto"` does for callbacks.
    """
    if direction == "auto":
        direction = "minimize" if metric.endswith("loss") else "maximize"
    sign = -1 if direction == "maximize" else 1

    def order(job: Job) -> tuple[int, float]:
        value = job.metrics.get(metric)
        if isinstance(value, (int, float)) and value == value:  # not None, not NaN
            return 0, sign * value
        return {"finished": 1, "failed": 2, "incomplete": 3}[job.status], 0.0

    return sorted(jobs, key=order)


def write_summary(sweep_dir: str | Path, metric: str, direction: str = "auto") -> list[Job]:
    """Writes `sweep_summary.csv` and `sweep_summary.md` into `sweep_dir`, best job first.

    The CSV has every override and every metric of every job; the Markdown table shows the overrides
    that differ between jobs (the others are listed once above it). Failed jobs come last with their
    error. Both files are written atomically, so they can be rewritten after every batch of jobs.

    Args:
        sweep_dir: the sweep folder (`hydra.sweep.dir`).
        metric: the key of `metrics.json` to rank by (`optimized_metric`).
        direction: `maximize`, `minimize` or `auto` (see `best_first`).

    Returns:
        The jobs in the order of the tables.
    """
    sweep_dir = Path(sweep_dir)
    jobs = best_first(read_jobs(sweep_dir), metric, direction)
    keys = unique(key for job in jobs for key, _ in map(split_override, job.overrides))
    values = [dict(map(split_override, job.overrides)) for job in jobs]
    metrics = unique([metric, *sorted(name for job in jobs for name in job.metrics)])
    metrics = [name for name in metrics if any(name in job.metrics for job in jobs)]

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["job", "status", *keys, *metrics, "error"])
    for job, job_values in zip(jobs, values):
        writer.writerow([job.name, job.status, *(job_values.get(key, "") for key in keys),
                         *(job.metrics.get(name, "") for name in metrics), job.error])
    atomic_write_text(sweep_dir / SUMMARY_CSV, table.getvalue())

    varying = [key for key in keys if len({job_values.get(key) for job_values in values}) > 1]
    common = [f"`{key}={values[0][key]}`" for key in keys if key not in varying]
    counts = ", ".join(f"{sum(job.status == status for job in jobs)} {status}"
                       for status in ("finished", "failed", "incomplete"))
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"{len(jobs)} jobs: {counts}. Best first by `{metric}`; `tensorboard --logdir {sweep_dir}` "
             "compares them under HParams.", ""]
    if common:
        lines += [f"Every job: {' '.join(common)}", ""]
    lines += ["| " + " | ".join(["job", *varying, *metrics, "status"]) + " |",
              "|" + "---|" * (len(varying) + len(metrics) + 2)]
    for job, job_values in zip(jobs, values):
        status = f"failed: {job.error}" if job.status == "failed" else job.status
        cells = [job.name, *(job_values.get(key, "") for key in varying),
                 *(format_value(job.metrics.get(name, "")) for name in metrics), status]
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    atomic_write_text(sweep_dir / SUMMARY_MARKDOWN, "\n".join(lines) + "\n")
    return jobs


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def format_value(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.sweeps SWEEP_DIR`: writes the summary of a sweep another launcher ran."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", help="metrics.json key to rank by (default: the jobs' optimized_metric)")
    parser.add_argument("--direction", default="auto", choices=["auto", "maximize", "minimize"])
    arguments = parser.parse_args(argv)
    jobs = read_jobs(arguments.sweep_dir)
    if not jobs:
        parser.error(f"{arguments.sweep_dir} has no job folders (folders with .hydra/overrides.yaml)")
    metric = arguments.metric or OmegaConf.load(jobs[0].folder / ".hydra" / "config.yaml").optimized_metric
    write_summary(arguments.sweep_dir, metric, arguments.direction)
    print((arguments.sweep_dir / SUMMARY_MARKDOWN).read_text())


if __name__ == "__main__":
    main()
