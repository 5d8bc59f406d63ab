"""Runs never mix: real `train.py` processes started together, killed, resumed and rerun in used folders.

Each test injects its fault for real (two processes at once, SIGKILL at a chosen moment, a changed data
set, a killed sweep launcher) and checks what a user relies on: one run per folder, and a resumed run
that ends exactly as an uninterrupted one, default callbacks (EarlyStopping, Checkpoint) included.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.sweeps import read_job
from tests.conftest import CONF, TINY, write_photo_folder
from tests.reliability.test_integrity import crafted_png
from tests.reliability.test_interruptions import kill_when, mount  # noqa: F401  (mount: a fixture)

TRAIN = str(CONF.parent / "train.py")
# The default callbacks, EarlyStopping included (debug=tiny removes it); deterministic ops, so an
# interrupted and resumed run can be compared with an uninterrupted one to 1e-6. With random MobileNet
# features the head barely learns: EarlyStopping (patience 3) stops after 4 epochs and restores epoch 1.
EXACT_DEFAULT_CALLBACKS = ["backbone=mobilenet", "backbone.weights=null", "dataset=folder",
                           "dataset.validation_percent=25", "dataset.test_percent=25", "image_size=[64,64]",
                           "batch_size=8", "verbose=0", "deterministic=true", "epochs=30", "optimizer=sgd",
                           "optimizer.learning_rate=0.05", "callbacks.early_stopping.patience=3",
                           "task.fine_tune_epochs=2", "task.fine_tune_layers=3"]


def train(tmp_path, *overrides, run=None, cwd=None):
    argv = [sys.executable, TRAIN, f"paths.root={tmp_path}", *([f"hydra.run.dir={run}"] if run else []),
            *overrides]
    return subprocess.Popen(argv, cwd=cwd or CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(process, timeout=900, code=0):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == code, stderr[-4000:]
    return stdout, stderr


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv") as file:
        return list(csv.DictReader(file))


def data_rows(run_dir: Path) -> int:
    path = run_dir / "history.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def assert_same_run(expected: Path, actual: Path, tolerance=1e-6):
    a, b = (json.loads((folder / "metrics.json").read_text()) for folder in (expected, actual))
    for key in ("test/loss", "test/accuracy", "validation/loss", "validation/accuracy"):
        assert abs(a[key] - b[key]) <= tolerance, (key, a[key], b[key])
    rows_a, rows_b = history(expected), history(actual)
    assert [row["epoch"] for row in rows_b] == [row["epoch"] for row in rows_a], "each epoch once, none lost"
    for row_a, row_b in zip(rows_a, rows_b):
        for key in ("loss", "val_loss"):
            assert abs(float(row_a[key]) - float(row_b[key])) <= tolerance, (row_a["epoch"], key)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The photo folder plus a FIFO, a link to /dev/zero and a pixel bomb, which every run must skip."""
    photos = write_photo_folder(tmp_path_factory.mktemp("data") / "photos")
    os.mkfifo(photos / "cat" / "pipe.jpg")
    (photos / "coffee" / "zero.png").symlink_to("/dev/zero")
    (photos / "rocket" / "huge.png").write_bytes(crafted_png(20000, 20000))
    return photos


@pytest.fixture(scope="module")
def uninterrupted(photos, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted run with the default callbacks: the reference every resumed run must equal."""
    root = tmp_path_factory.mktemp("uninterrupted")
    _, stderr = finish(train(root, *EXACT_DEFAULT_CALLBACKS, f"dataset.root={photos}", run=root / "run"))
    return root / "run", stderr


def test_two_runs_started_together_get_two_folders_and_a_live_folder_is_refused(tmp_path):
    # A missing data set makes each run fail fast, after Hydra made its folder and the run locked it.
    runs = [train(tmp_path, "dataset=folder", f"dataset.root={tmp_path}/missing", cwd=tmp_path) for _ in range(2)]
    for process in runs:
        finish(process, code=1)
    folders = sorted(path.parent for path in tmp_path.glob("outputs/*/*/error.txt"))
    assert len(folders) == 2, "two runs, two folders (they used to share outputs/<date>/<HH-MM-SS>)"
    for folder in folders:
        assert (folder / "train.log").read_text().count("does not exist or is not a folder") == 1, \
            "one run's log per folder" 

    holder = subprocess.Popen([sys.executable, "-c", "import time; from pipeline.runs import lock_folder; "
                               f"lock_folder({str(tmp_path / 'busy')!r}); print('locked', flush=True); "
                               "time.sleep(600)"], cwd=CONF.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _, stderr = finish(train(tmp_path, "dataset=folder", f"dataset.root={tmp_path}/missing",
                                 run=tmp_path / "busy"), code=1)
    finally:
        holder.kill()
        holder.wait()
    assert f"RunFolderBusy: Run folder {tmp_path / 'busy'} is in use by another run (process {holder.pid})" in stderr
    assert not (tmp_path / "busy" / "unfinished.txt").exists(), "the refused run wrote nothing of its own"


def test_a_reused_run_folder_describes_only_the_new_run_and_bad_files_are_listed(photos, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    skipped = (reference / "skipped_files.txt").read_text()
    for name, reason in [("pipe.jpg", "not a regular file (a FIFO)"), ("zero.png", "not a regular file (a device)"),
                         ("huge.png", "20000x20000 is 400000000 pixels, over the limit")]:
        assert any(name in line and reason in line for line in skipped.splitlines()), (name, skipped)
    run = tmp_path / "run"
    shutil.copytree(reference, run)  # a finished run's folder
    old_metrics = (run / "metrics.json").read_text()

    # The same folder, a command that fails (MobileNet refuses 16x16 images at build time).
    _, stderr = finish(train(tmp_path, *TINY, f"dataset.root={photos}", "image_size=[16,16]", run=run), code=1)
    assert f"{run} held another run's outputs; they were moved to {run / 'previous-1'}" in stderr
    assert not (run / "metrics.json").exists() and (run / "error.txt").exists()
    assert not (run / "history.csv").exists() and not (run / "tensorboard").exists()
    assert (run / "previous-1" / "metrics.json").read_text() == old_metrics
    assert (run / "previous-1" / "history.csv").exists() and (run / "previous-1" / "tensorboard").exists()
    assert (run / "unfinished.txt").exists()
    assert read_job(run).status == "failed", "a failed rerun no longer looks finished"


def test_sigkill_then_the_same_command_continues_in_its_folder_and_equals_the_uninterrupted_run(
        photos, uninterrupted, tmp_path):
    reference, reference_log = uninterrupted
    assert "Resuming" not in reference_log, "a first run resumes nothing (fine-tuning included)"
    epochs = [int(row["epoch"]) for row in history(reference)]
    assert epochs[:-2] == list(range(len(epochs) - 2)) and len(epochs) - 2 < 30, \
        "EarlyStopping ended the head phase early: its state matters for the resume"

    killed = tmp_path / "killed"
    argv = [*EXACT_DEFAULT_CALLBACKS, f"dataset.root={photos}"]
    # After CSVLogger wrote epoch 2's row, before (or just after) the resume state of that epoch is saved.
    kill_when(train(tmp_path, *argv, run=killed), lambda: data_rows(killed) >= 2)
    assert (killed / "unfinished.txt").exists() and not (killed / "metrics.json").exists()

    rerun = tmp_path / "rerun"  # a new folder, as a rerun with the default hydra.run.dir gets
    stdout, stderr = finish(train(tmp_path, *argv, run=rerun))
    assert "Resuming head training at epoch" in stderr
    assert f"Continuing the interrupted run in {killed}" in stderr
    assert stdout.strip().endswith(f"reports: {killed}")
    assert_same_run(reference, killed)
    assert not (killed / "unfinished.txt").exists()
    assert "Resuming head training" in (killed / "train.log").read_text(), "one log with both parts"
    assert str(killed) in (rerun / "continued_in.txt").read_text() and not (rerun / "metrics.json").exists()
    assert not list((tmp_path / ".cache" / "resume").rglob("*.weights.h5")), "finished: nothing left to resume"


@pytest.mark.slow
def test_resume_state_of_another_data_set_is_discarded_with_one_line(tmp_path):
    photos = write_photo_folder(tmp_path / "photos")
    argv = [*TINY, f"dataset.root={photos}", "epochs=8"]
    kill_when(train(tmp_path, *argv, run=tmp_path / "killed"),
              lambda: list((tmp_path / ".cache" / "resume").rglob("epoch-0002.weights.h5")))
    shutil.copytree(photos / "coffee", photos / "tea")  # a class added: a 4-way head
    for image in (photos / "tea").iterdir():
        image.rename(image.with_name("tea" + image.name))
    _, stderr = finish(train(tmp_path, *argv, run=tmp_path / "rerun"))
    assert "Discarding the saved state of an interrupted run" in stderr and "training starts at epoch 1" in stderr
    assert "Resuming" not in stderr
    assert len(history(tmp_path / "rerun")) == 8
    assert json.loads((tmp_path / "rerun" / "class_names.json").read_text())[-1] == "tea"


def kill_moments(root: Path, folder: Path, rng: random.Random) -> list[tuple[str, object]]:
    """Moments to SIGKILL a run at, in the order a run reaches them, each with a random parameter."""
    def entries():
        return len(list((root / ".cache" / "features").rglob("*.tensor")))

    def exists(name):
        return lambda: (folder / name).exists()

    caching, head = rng.randint(1, 30), rng.randint(1, 2)
    return [("start-up", lambda: (folder / "unfinished.txt").exists()),
            (f"caching (after {caching} entries)", lambda: entries() >= caching),
            (f"head epoch {head + 1}", lambda: data_rows(folder) >= head),
            ("head epoch 4", lambda: data_rows(folder) >= 3),
            ("fine-tuning epoch 1", lambda: data_rows(folder) >= 5),
            ("model.keras", exists("model.keras")),
            ("predictions.csv", exists("predictions.csv")),
            ("confusion_matrix.png", exists("confusion_matrix.png"))]


@pytest.mark.slow
def test_kill_loop_random_sigkills_then_the_same_command_equals_the_uninterrupted_run(
        photos, uninterrupted, tmp_path):
    """SIGKILLs at random moments of start-up, caching, training and reports; each time the same command.

    Every round (KILL_LOOP_ROUNDS, default 1) starts with an empty cache and kills the run once at each
    moment of `kill_moments` (plus 0-0.3 s), running the same command again after each kill; then the
    command finishes the run, which must equal the uninterrupted one, default callbacks included.
    """
    reference, _ = uninterrupted
    rounds = int(os.environ.get("KILL_LOOP_ROUNDS", "1"))
    rng = random.Random(int(os.environ.get("KILL_LOOP_SEED", "12")))
    kills = []
    for round_number in range(rounds):
        root = tmp_path / f"round{round_number}"
        folder = root / "run"
        argv = [*EXACT_DEFAULT_CALLBACKS, f"dataset.root={photos}"]
        for moment, condition in kill_moments(root, folder, rng):
            process = train(root, *argv, run=folder)
            deadline = time.monotonic() + 600
            while not condition() and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kills.append(moment)
            else:  # finished before that moment: nothing left to interrupt in this round
                finish(process)
                break
        else:
            finish(train(root, *argv, run=folder))
        assert_same_run(reference, folder)
    print(f"kill loop: {len(kills)} SIGKILLs in {rounds} round(s) ({', '.join(kills)}), each followed by "
          "the same command; every round ended equal to the uninterrupted run")
    assert len(kills) >= 6 * rounds

def sweep(tmp_path, photos, *overrides, cwd=None, train_py=TRAIN, env=None):
    argv = [sys.executable, train_py, "-m", f"paths.root={tmp_path}", *TINY, f"dataset.root={photos}",
            f"hydra.sweep.dir={tmp_path}/sweep", *overrides]
    return subprocess.Popen(argv, cwd=cwd or CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie whose new parent has not reaped it yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("signal_number", [pytest.param(signal.SIGKILL, id="SIGKILL"),
                                           pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow)])
def test_a_killed_sweep_launcher_takes_its_job_along_and_a_busy_job_folder_is_never_run_twice(
        signal_number, photos, tmp_path):
    from pipeline.runs import folder_owner

    launcher = sweep(tmp_path, photos, "epochs=400", "task.dropout_rate=0.1,0.2")
    job = tmp_path / "sweep" / "0"
    deadline = time.monotonic() + 300
    while data_rows(job) < 1:  # the job is training
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    trainer = folder_owner(job)
    assert trainer not in (None, launcher.pid)
    os.kill(launcher.pid, signal_number)  # the launcher alone, not its process group
    launcher.wait()
    deadline = time.monotonic() + 30
    # The lock goes with the last of the job's threads, which may outlive its main thread's zombie a moment.
    while not gone(trainer) or folder_owner(job) is not None:
        assert time.monotonic() < deadline, "the job went on training without its launcher"
        time.sleep(0.05)

    # A job folder another process owns is never started again beside it.
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pipeline.runs import lock_folder; "
                               f"lock_folder({str(job)!r}); print('locked', flush=True); time.sleep(600)"],
                              cwd=CONF.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rows = data_rows(job)
        stdout, stderr = finish(sweep(tmp_path, photos, "epochs=400", "task.dropout_rate=0.1"), code=1)
    finally:
        holder.kill()
        holder.wait()
    assert f"#0 not started: {job} is in use by process {holder.pid}" in stdout + stderr
    assert data_rows(job) == rows


@pytest.mark.slow
def test_a_sweep_rerun_skips_a_job_only_when_its_whole_config_is_unchanged(photos, tmp_path):
    repo = tmp_path / "repo"  # a copy of the project's scripts and conf/, to edit conf/ as a user would
    shutil.copytree(CONF, repo / "conf")
    shutil.copy(TRAIN, repo / "train.py")
    env = {**os.environ, "PYTHONPATH": str(CONF.parent)}

    def run_sweep():
        return finish(sweep(tmp_path, photos, "task.dropout_rate=0.3", cwd=repo, train_py=str(repo / "train.py"),
                            env=env))

    run_sweep()
    metrics = tmp_path / "sweep" / "0" / "metrics.json"
    assert json.loads(metrics.read_text())["test/examples"] > 0
    metrics.write_text('{"test/accuracy": 0.9')  # cut off: unreadable
    stdout, stderr = run_sweep()
    assert f"{metrics} cannot be read" in stdout + stderr and "JSONDecodeError" not in stdout + stderr
    assert "#0 started" in stdout and json.loads(metrics.read_text())["test/examples"] > 0

    task = repo / "conf" / "task" / "transfer.yaml"
    task.write_text(task.read_text().replace("pooling: avg", "pooling: max"))
    stdout, _ = run_sweep()
    assert "holds a finished job with another config" in stdout and "#0 started" in stdout
    assert "pooling: max" in (tmp_path / "sweep" / "0" / ".hydra" / "config.yaml").read_text()
    stdout, _ = run_sweep()
    assert "#0 skipped: finished before" in stdout


@pytest.mark.slow
def test_a_read_only_cache_with_every_feature_says_what_to_do(photos, tmp_path, mount):
    cache = tmp_path / "cache"
    finish(train(tmp_path, *TINY, f"dataset.root={photos}", f"paths.cache_dir={cache}", run=tmp_path / "first"))
    mount("--bind", "-o", "ro", str(cache), str(cache))
    _, stderr = finish(train(tmp_path, *TINY, f"dataset.root={photos}", f"paths.cache_dir={cache}",
                             run=tmp_path / "second"), code=1)
    assert f"Cannot save the resume state in {cache / 'resume'}" in stderr and "Read-only file system" in stderr
    assert "Run with resume=false, or set paths.cache_dir" in stderr and "Traceback" not in stderr
    finish(train(tmp_path, *TINY, f"dataset.root={photos}", f"paths.cache_dir={cache}", "resume=false",
                 run=tmp_path / "third"))
    assert (tmp_path / "third" / "metrics.json").exists()
