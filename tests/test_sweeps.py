"""Sweeps (`python train.py -m`): a process per job, failures recorded, resume after SIGKILL, summary, Optuna.

The end-to-end sweeps run under both Keras backends (the `jax` variants are slow): every job is a
`train.py` process of its own, which inherits KERAS_BACKEND from the sweep's command.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.sweeps import error_line, read_jobs, sweep_id, write_summary
from tests.conftest import CONF, TINY

TRAIN = str(CONF.parent / "train.py")
PID_FORMAT = "hydra.job_logging.formatters.simple.format='[pid %(process)d] %(message)s'"  # jobs log their pid
BACKENDS = ["tensorflow", pytest.param("jax", marks=pytest.mark.slow)]


def sweep_command(tmp_path: Path, photo_folder: Path, *overrides: str) -> list[str]:
    """`train.py -m` run from `tmp_path`, so the default sweep folder is `tmp_path/multirun/<id>`."""
    return [sys.executable, TRAIN, "-m", f"paths.root={tmp_path}", *TINY, f"dataset.root={photo_folder}",
            *overrides, PID_FORMAT]


def start(argv: list[str], cwd: Path, backend: str = "tensorflow") -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "KERAS_BACKEND": backend})


def run(argv: list[str], cwd: Path, backend: str = "tensorflow") -> tuple[subprocess.Popen, str, str]:
    process = start(argv, cwd, backend)
    stdout, stderr = process.communicate(timeout=900)
    return process, stdout, stderr


def the_sweep_folder(tmp_path: Path) -> Path:
    folders = list((tmp_path / "multirun").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def job_pid(job_folder: Path) -> int:
    return int(re.match(r"\[pid (\d+)\]", (job_folder / "train.log").read_text()).group(1))


def metrics(job_folder: Path) -> dict[str, float]:
    return json.loads((job_folder / "metrics.json").read_text())


def files_and_mtimes(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def hparams_sessions(logdir: Path) -> list:
    """The session groups TensorBoard's HParams tab shows for `tensorboard --logdir logdir`."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, hparams_plugin, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    plugin = hparams_plugin.HParamsPlugin(base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir))))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[
        api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    return list(list_session_groups.Handler(context.RequestContext(), plugin._context, "", request).run()
                .session_groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sweep_killed_after_its_first_job_resumes_records_a_failed_job_and_summarises(backend, photo_folder,
                                                                                        tmp_path):
    # image_size=[16,16] passes composition but MobileNet refuses it at run time: job 1 fails.
    argv = sweep_command(tmp_path, photo_folder, "image_size=[64,64],[16,16],[32,32]")
    first = start(argv, tmp_path, backend)
    deadline = time.monotonic() + 600
    while not list(tmp_path.glob("multirun/*/1/.hydra/overrides.yaml")):  # job 0 done, job 1 begun
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and its job
    first.wait()
    sweep = the_sweep_folder(tmp_path)
    assert re.fullmatch(r"sweep-[0-9a-f]{8}", sweep.name)
    assert (sweep / "0" / "metrics.json").exists() and not (sweep / "2").exists()
    first_job = files_and_mtimes(sweep / "0")

    # The same command: the same folder; job 0 is skipped, job 1 fails, job 2 still runs.
    process, stdout, stderr = run(argv, tmp_path, backend)
    assert the_sweep_folder(tmp_path) == sweep
    assert f"Sweep folder: multirun/{sweep.name}" in stdout
    assert f"#0 skipped: finished before in {sweep / '0'}" in stdout and "#0 started" not in stdout
    assert files_and_mtimes(sweep / "0") == first_job, "the finished job's folder is untouched"
    assert process.returncode == 1, "a failed job makes the exit code 1, after the other jobs ran"
    assert "Job #1 of the sweep failed: ValueError: Backbone 'mobilenet' cannot be built with image_size=[16, 16]" \
        in stderr
    assert "Traceback" not in stderr, "one clear line per failure; the traceback is in error.txt"
    assert "Traceback" in (sweep / "1" / "error.txt").read_text()
    assert not (sweep / "1" / "metrics.json").exists()
    assert metrics(sweep / "2")["test/examples"] > 0

    pids = [job_pid(sweep / str(job)) for job in range(3)]
    assert len({*pids, first.pid, process.pid}) == 5, "each job ran in its own process, none in a launcher's"
    for job in (1, 2):
        assert f"#{job} started in process {pids[job]}:" in stdout

    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [row["status"] for row in rows] == ["finished", "finished", "failed"]
    assert rows[-1]["job"] == "1" and rows[-1]["image_size"] == "[16,16]"
    assert rows[-1]["error"].startswith("ValueError: Backbone 'mobilenet' cannot be built with image_size=[16, 16]")
    scores = [float(row["validation/accuracy"]) for row in rows[:2]]
    assert scores == sorted(scores, reverse=True), "best first"
    for row in rows[:2]:
        saved = metrics(sweep / row["job"])
        numbers = {name: value for name, value in saved.items() if isinstance(value, (int, float))}
        assert {name: float(row[name]) for name in numbers} == numbers
        assert row["backend"] == saved["backend"] == backend, "each job ran under the sweep's backend"
    markdown = (sweep / "sweep_summary.md").read_text()
    assert "| job | image_size | validation/accuracy |" in markdown and "| failed: ValueError: Backbone" in markdown

    # `tensorboard --logdir <sweep>`: one HParams session per job that began training, with its values,
    # status and metrics (each final metric once, in the run of its split). Job 1 failed while building
    # its model, before its run folder was settled: it is in error.txt and the summary, not in TensorBoard.
    from tensorboard.plugins.hparams import api_pb2

    sessions = {group.hparams["image_size"].string_value: group for group in hparams_sessions(sweep)}
    assert sorted(sessions) == ["[32, 32]", "[64, 64]"]
    for job, size in (("0", "[64, 64]"), ("2", "[32, 32]")):
        group = sessions[size]
        assert [session.status for session in group.sessions] == [api_pb2.STATUS_SUCCESS]
        accuracy = [metric.value for metric in group.metric_values if metric.name.tag == "validation/accuracy"]
        assert accuracy == pytest.approx([metrics(sweep / job)["validation/accuracy"]])
        assert [metric.name.group for metric in group.metric_values
                if metric.name.tag == "validation/accuracy"] == ["validation"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_optuna_sweep_gets_each_jobs_metric_and_resumes_by_skipping_finished_trials(backend, photo_folder,
                                                                                    tmp_path):
    argv = sweep_command(tmp_path, photo_folder, "sweep=optuna_head", "hydra.sweeper.n_trials=2")
    process, stdout, stderr = run(argv, tmp_path, backend)
    assert process.returncode == 0, stderr[-3000:]
    sweep = the_sweep_folder(tmp_path)
    assert sweep.name.startswith("optuna_head-")
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    scores = [metrics(sweep / str(job))["validation/accuracy"] for job in range(2)]
    assert results.best_value == max(scores), "Optuna received the jobs' validation/accuracy"
    assert [metrics(sweep / str(job))["backend"] for job in range(2)] == [backend, backend]
    for job in read_jobs(sweep):
        values = dict(override.split("=", 1) for override in job.overrides)
        assert 1e-5 <= float(values["optimizer.learning_rate"]) <= 1e-2
        assert 0.0 <= float(values["task.dropout_rate"]) <= 0.6

    process, stdout, stderr = run(argv, tmp_path, backend)  # the seeded sampler proposes the same trials
    assert process.returncode == 0, stderr[-3000:]
    assert "#0 skipped" in stdout and "#1 skipped" in stdout and "started in process" not in stdout
    assert OmegaConf.load(sweep / "optimization_results.yaml") == results


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_in_process_launchers_record_a_failed_job_and_go_on_and_the_summary_command(backend, photo_folder,
                                                                                     tmp_path):
    # Hydra's basic launcher runs jobs in this process: train.py raises instead of sys.exit for them.
    process, stdout, stderr = run(sweep_command(tmp_path, photo_folder, "hydra/launcher=basic",
                                                "image_size=[16,16],[64,64]"), tmp_path, backend)
    sweep = the_sweep_folder(tmp_path)
    assert process.returncode == 1
    assert "\nValueError: Backbone 'mobilenet' cannot be built with image_size=[16, 16]" in stderr
    assert (sweep / "0" / "error.txt").exists() and (sweep / "1" / "metrics.json").exists()
    assert job_pid(sweep / "0") == job_pid(sweep / "1") == process.pid
    assert metrics(sweep / "1")["backend"] == backend

    result = subprocess.run([sys.executable, "-m", "pipeline.sweeps", str(sweep)], cwd=CONF.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [(row["job"], row["status"]) for row in rows] == [("1", "finished"), ("0", "failed")]


# Fast checks without training.

def test_a_sweep_rerun_under_the_other_backend_runs_its_finished_jobs_again(tmp_path):
    """The backend is not in the config: a job that finished under TensorFlow is not JAX's result."""
    # One job that stops at its config check (no data, about a second), then made to look finished.
    argv = [sys.executable, TRAIN, "-m", f"paths.root={tmp_path}", "dataset=folder",
            f"dataset.root={tmp_path / 'missing'}", "seed=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    process, _, stderr = run(argv, tmp_path)
    job = tmp_path / "sweep" / "0"
    assert process.returncode == 1 and (job / "error.txt").exists(), stderr[-3000:]
    (job / "error.txt").unlink()
    (job / "metrics.json").write_text(json.dumps({"backend": "tensorflow", "validation/accuracy": 0.5}))

    process, stdout, stderr = run(argv, tmp_path, "tensorflow")
    assert process.returncode == 0 and f"#0 skipped: finished before in {job}" in stdout + stderr
    process, stdout, stderr = run(argv, tmp_path, "jax")
    assert f"#0: {job} holds a job finished under the tensorflow backend, and this sweep runs under jax; it is " \
           f"run again, the old outputs are in {job / 'previous-1'}" in stdout + stderr
    assert "#0 started" in stdout + stderr and process.returncode == 1, "run (and failed again: no data)"
    assert json.loads((job / "previous-1" / "metrics.json").read_text())["backend"] == "tensorflow"

def test_the_default_launcher_for_multirun_is_the_process_per_job_one():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = [plugin.__name__ for plugin in Plugins.instance().discover(Launcher)]
    assert "ProcessPerJobLauncher" in names, "hydra_plugins/pipeline_launcher is found"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        launcher = compose("train", return_hydra_config=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.pipeline_launcher.process_per_job.ProcessPerJobLauncher"
    assert launcher.n_jobs == 1


def test_sweep_folder_is_the_same_for_the_same_command_and_differs_otherwise():
    def folder(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.sweep.dir

    assert folder("sweep=head", "seed=1") == folder("sweep=head", "seed=1")
    assert re.fullmatch(r"multirun/head-[0-9a-f]{8}", folder("sweep=head", "seed=1"))
    assert folder("sweep=head", "seed=1") != folder("sweep=head", "seed=2")
    assert sweep_id("train", ["optimizer.learning_rate=1e-3,1e-4"]).startswith("sweep-")
    assert sweep_id("train", ["+sweep=my grid"]).startswith("my_grid-")
    assert sweep_id("train", ["a=1"]) != sweep_id("predict", ["a=1"])
    assert sweep_id("train", OmegaConf.create(["x=${hydra:runtime.cwd}"])).startswith("sweep-"), "kept as typed"


def write_job(folder: Path, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.txt").write_text(error)


TRACEBACK = """Traceback (most recent call last):
  File "train.py", line 1, in main
    raise KeyError("inner")
KeyError: 'inner'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "pipeline/run.py", line 2, in train
    raise ValueError("outer | with a pipe\\nand a second line")
ValueError: outer | with a pipe
and a second line
"""


def test_summary_lists_jobs_best_first_then_failed_then_incomplete(tmp_path):
    write_job(tmp_path / "0", ["lr=0.1", "backbone=a"], {"validation/accuracy": 0.5, "validation/loss": 0.9})
    write_job(tmp_path / "1", ["lr=0.01", "backbone=a"], error=TRACEBACK)
    write_job(tmp_path / "2", ["lr=0.001", "backbone=a"], {"validation/accuracy": 0.75, "validation/loss": 1.2})
    write_job(tmp_path / "10", ["lr=0.0001", "backbone=a"])  # killed: neither metrics.json nor error.txt
    write_job(tmp_path / "3", ["lr=1", "backbone=a"], {"validation/loss": 0.1})

    jobs = write_summary(tmp_path, "validation/accuracy")
    assert [(job.name, job.status) for job in jobs] == [
        ("2", "finished"), ("0", "finished"), ("3", "finished"), ("1", "failed"), ("10", "incomplete")]
    assert jobs[3].error == "ValueError: outer | with a pipe"
    rows = list(csv.DictReader(open(tmp_path / "sweep_summary.csv")))
    assert list(rows[0]) == ["job", "status", "lr", "backbone", "validation/accuracy", "validation/loss", "error"]
    assert [row["lr"] for row in rows] == ["0.001", "0.1", "1", "0.01", "0.0001"]
    assert float(rows[0]["validation/loss"]) == 1.2
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "Every job: `backbone=a`" in markdown
    assert "| job | lr | validation/accuracy | validation/loss | status |" in markdown
    assert "| 2 | 0.001 | 0.7500 | 1.2000 | finished |" in markdown
    assert "| 1 | 0.01 |  |  | failed: ValueError: outer \\| with a pipe |" in markdown

    by_loss = write_summary(tmp_path, "validation/loss")  # a loss: lowest first, as Keras's mode="auto"
    assert [job.name for job in by_loss][:3] == ["3", "0", "2"]
    assert [job.name for job in read_jobs(tmp_path)] == ["0", "1", "2", "3", "10"]


def test_error_line_is_the_last_exceptions_first_line():
    assert error_line(TRACEBACK) == "ValueError: outer | with a pipe"
    assert error_line("RuntimeError: the job's process was killed by SIGKILL\n") == \
        "RuntimeError: the job's process was killed by SIGKILL"


@pytest.mark.parametrize("path", ["/data/run 1/0", "/data/it's/0", "/data/a,b=[c]/0", "/data/back\\slash\\", "/q\\'x"])
def test_job_folders_with_odd_characters_reach_the_job_unchanged(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.pipeline_launcher.process_per_job import quote

    assert OverridesParser.create().parse_override(f"hydra.run.dir={quote(path)}").value() == path
