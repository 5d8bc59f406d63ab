"""Fault injection with real processes: SIGKILL, two runs on one cache, a full disk, a read-only folder.

The faults that reach backend-specific code (predicting features for the cache, saving checkpoints and
model.keras, a sweep's jobs) run under both Keras backends. The `jax` variants are slow, except the
kill while model.keras is written, which CI runs under JAX too (one tiny run, no rerun). The read-only
output folder stops Hydra before Keras is imported: TensorFlow only.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from PIL import Image

import pipeline.layers  # noqa: F401  registers ImagePreprocessing, to load exported models
from pipeline.cache import ENTRY_HEADER_BYTES, ENTRY_MAGIC, entry_problem
from tests.conftest import CONF, TINY, write_photo_folder

JAX_SLOW = pytest.param("jax", marks=pytest.mark.slow)
RANDOM_224 = ["backbone=mobilenet", "backbone.weights=null", "dataset=folder", "verbose=0",
              "dataset.validation_percent=25", "dataset.test_percent=25", "batch_size=8",
              "callbacks.early_stopping=null"]


def command(tmp_path, run, *overrides, cache=None):
    return [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/{run}",
            *([f"paths.cache_dir={cache}"] if cache else []), *overrides]


def start(argv, env=None):
    return subprocess.Popen(argv, cwd=CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})


def kill_when(process, condition, timeout=600):
    """SIGKILLs the process (and its children) as soon as `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"finished before the fault: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(argv, env=None):
    result = subprocess.run(argv, cwd=CONF.parent, capture_output=True, text=True, timeout=900,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def entries(cache):
    """Complete cache entries (a kill may leave a hidden `.tmp-*` file, which nothing reads)."""
    return sorted(p for p in Path(cache).rglob("*.tensor") if not p.name.startswith("."))


def assert_entries_whole(cache):
    for entry in entries(cache):
        shape = json.loads(entry.read_bytes()[len(ENTRY_MAGIC):ENTRY_HEADER_BYTES])["shape"]
        assert len(shape) == 3 and entry_problem(entry, entry.stem, tuple(shape)) is None, entry


def assert_reports_whole(run_dir):
    """Every report that exists is complete, whatever instant the run stopped."""
    for name in ("confusion_matrix.csv", "per_class_metrics.csv", "predictions.csv"):
        if (run_dir / name).exists():
            rows = list(csv.reader(open(run_dir / name)))
            assert len({len(row) for row in rows}) == 1 and len(rows) > 1, name
    for name in ("confusion_matrix.png", "predictions.png"):
        if (run_dir / name).exists():
            Image.open(run_dir / name).load()
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "backend" in metrics and "test/accuracy" in metrics, "metrics.json is written once, whole"
        assert (run_dir / "model.keras").exists(), "metrics.json is written last"


@pytest.mark.parametrize("backend", ["tensorflow", JAX_SLOW])
def test_sigkill_while_caching_leaves_no_partial_entry_and_the_rerun_completes(backend, tmp_path):
    photos = write_photo_folder(tmp_path / "photos", images_per_class=60)
    argv = command(tmp_path, "run", *RANDOM_224, f"dataset.root={photos}", "epochs=1")
    cache = tmp_path / ".cache" / "features"
    env = {"KERAS_BACKEND": backend}
    kill_when(start(argv, env), lambda: len(entries(cache)) >= 20)
    assert 20 <= len(entries(cache)) < 180
    assert_entries_whole(cache)
    assert not (tmp_path / "run" / "metrics.json").exists()

    before = len(entries(cache))
    result = finish(argv, env)
    assert f"Caching train features: " in result.stderr and f"Keras backend: {backend}" in result.stderr
    assert len(entries(cache)) == 180
    assert_entries_whole(cache)
    hits = sum(int(line.split(": ")[1].split(" cache hits")[0]) for line in result.stderr.splitlines()
               if "cache hits" in line)
    assert hits == before, "the rerun reuses every entry the killed run finished"


@pytest.mark.parametrize("backend", ["tensorflow", JAX_SLOW])
def test_sigkill_while_training_keeps_a_whole_checkpoint_and_the_rerun_completes(backend, photo_folder, tmp_path):
    argv = command(tmp_path, "run", *TINY, f"dataset.root={photo_folder}", "epochs=400")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.keras"
    env = {"KERAS_BACKEND": backend}
    kill_when(start(argv, env), lambda: checkpoint.exists() and checkpoint.stat().st_size > 0)
    keras.saving.load_model(checkpoint, safe_mode=True)  # here under TensorFlow, whichever backend saved it
    result = finish(command(tmp_path, "rerun", *TINY, f"dataset.root={photo_folder}"), env)
    assert f"Keras backend: {backend}" in result.stderr


@pytest.mark.parametrize("moment,backend", [
    ("model.keras", "tensorflow"), ("model.keras", "jax"),  # CI's kill test under JAX: one tiny run
    pytest.param("predictions.csv", "tensorflow", marks=pytest.mark.slow),
    pytest.param("confusion_matrix.png", "tensorflow", marks=pytest.mark.slow),
    pytest.param("metrics.json", "jax", marks=pytest.mark.slow)])
def test_sigkill_while_writing_reports_leaves_only_whole_files(moment, backend, photo_folder, tmp_path):
    argv = command(tmp_path, "run", *TINY, f"dataset.root={photo_folder}")
    run_dir = tmp_path / "run"
    kill_when(start(argv, {"KERAS_BACKEND": backend}), lambda: (run_dir / moment).exists())
    assert_reports_whole(run_dir)
    if (run_dir / "model.keras").exists():
        keras.saving.load_model(run_dir / "model.keras", safe_mode=True)


@pytest.mark.parametrize("backend", ["tensorflow", JAX_SLOW])
def test_two_runs_at_once_share_one_cache_without_corrupting_it(backend, tmp_path):
    photos = write_photo_folder(tmp_path / "photos", images_per_class=30)
    env = {"KERAS_BACKEND": backend}
    first = start(command(tmp_path, "a", *RANDOM_224, f"dataset.root={photos}", "epochs=1"), env)
    second = start(command(tmp_path, "b", *RANDOM_224, f"dataset.root={photos}", "epochs=1"), env)
    for process in (first, second):
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    assert len(entries(tmp_path / ".cache" / "features")) == 90
    assert_entries_whole(tmp_path / ".cache" / "features")
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in "ab")
    assert a["test/examples"] == b["test/examples"] and a["backend"] == b["backend"] == backend


@pytest.fixture
def mount(tmp_path):
    """Mounts for the test (needs root with mount rights, as on CI); unmounted afterwards."""
    mounted = []

    def make(*arguments):
        target = arguments[-1]
        Path(target).mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", *arguments], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount here: {result.stderr.strip()}")
        mounted.append(target)

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", target])


@pytest.mark.parametrize("backend", ["tensorflow", JAX_SLOW])
def test_full_disk_is_a_clear_error_and_keeps_the_cache_and_earlier_runs(backend, photo_folder, tmp_path, mount):
    env = {"KERAS_BACKEND": backend}
    finish(command(tmp_path, "earlier", *TINY, f"dataset.root={photo_folder}"), env)
    earlier = {p: p.read_bytes() for p in (tmp_path / "earlier").rglob("*") if p.is_file()}
    small = tmp_path / "small"
    mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small))  # room for 12 of the 36 features

    result = subprocess.run(command(small, "run", *TINY, f"dataset.root={photo_folder}",
                                    cache=small / "cache"), cwd=CONF.parent, capture_output=True,
                            text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 1
    assert "No space left on device" in result.stderr and "Is the disk full" in result.stderr
    assert "Traceback" not in result.stderr
    assert 0 < len(entries(small / "cache")) < 36
    assert_entries_whole(small / "cache")
    assert {p: p.read_bytes() for p in (tmp_path / "earlier").rglob("*") if p.is_file()} == earlier


def test_read_only_output_folder_is_a_clear_error(photo_folder, tmp_path, mount):
    finish(command(tmp_path, "outputs/earlier", *TINY, f"dataset.root={photo_folder}"))
    mount("--bind", "-o", "ro", str(tmp_path / "outputs"), str(tmp_path / "outputs"))
    result = subprocess.run(command(tmp_path, "outputs/new", *TINY, f"dataset.root={photo_folder}"),
                            cwd=CONF.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    assert (tmp_path / "outputs" / "earlier" / "metrics.json").exists()


# Slow under both: test_sweeps.py's killed grid sweep (default suite) kills a sweep and reruns it too.
@pytest.mark.parametrize("backend", [pytest.param("tensorflow", marks=pytest.mark.slow), JAX_SLOW])
def test_sigkill_during_a_sweep_then_the_rerun_finishes_every_job(backend, photo_folder, tmp_path):
    argv = [sys.executable, "train.py", "-m", f"paths.root={tmp_path}", *TINY,
            f"dataset.root={photo_folder}", "sweep=head", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {"KERAS_BACKEND": backend}
    kill_when(start(argv, env), lambda: (tmp_path / "sweep" / "0" / "metrics.json").exists())
    assert not (tmp_path / "sweep" / "3" / "metrics.json").exists()
    finish(argv, env)
    for job in range(4):
        metrics = json.loads((tmp_path / "sweep" / str(job) / "metrics.json").read_text())
        assert metrics["test/examples"] > 0 and metrics["backend"] == backend, "job 0's metrics.json is whole"
    assert_entries_whole(tmp_path / ".cache" / "features")
