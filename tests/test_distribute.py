"""Scale-out: logical-CPU mirroring, two real workers on 127.0.0.1, precision, and exact resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from hydra.utils import get_class, instantiate

from pipeline.run import train
from tests.conftest import CONF, TINY, compose_config

EXACT = [*TINY, "deterministic=true", "task.dropout_rate=0.0", "dataset.validation_percent=25",
         "dataset.test_percent=25"]


def cli(tmp_path, run, *overrides, env=None):
    argv = [sys.executable, "train.py", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/{run}", *overrides]
    return subprocess.Popen(argv, cwd=CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True)


def finished(process, timeout=900):
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def metrics(tmp_path, run):
    return json.loads((tmp_path / run / "metrics.json").read_text())


def assert_same_metrics(a, b, tolerance):
    for key in ("test/loss", "test/accuracy", "validation/loss", "validation/accuracy"):
        assert abs(a[key] - b[key]) <= tolerance, (key, a[key], b[key])


@pytest.mark.parametrize("task", ["transfer", pytest.param("classification", marks=pytest.mark.slow)])
def test_mirrored_over_two_cpus_equals_one_device_for_the_same_global_batch(task, photo_folder, tmp_path):
    common = [*EXACT, f"task={task}", f"dataset.root={photo_folder}", "epochs=3"]
    if task == "classification":
        common.append("task.augmentation=null")
    one = cli(tmp_path, "one", *common)
    finished(one)
    two = cli(tmp_path, "two", *common, "strategy=mirrored_cpu", "strategy.count=2")
    log = finished(two)
    assert "/cpu:1" in log or "CPU:1" in log, "two replicas"
    assert_same_metrics(metrics(tmp_path, "one"), metrics(tmp_path, "two"), tolerance=1e-4)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_localhost_train_once_and_only_the_chief_writes(photo_folder, tmp_path):
    common = [*EXACT, f"dataset.root={photo_folder}", "epochs=3", "strategy=multi_worker_mirrored"]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = [cli(tmp_path, f"worker{i}", *common,
                   env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
               for i in range(2)]
    logs = [finished(worker) for worker in workers]

    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    assert (chief / "metrics.json").exists() and (chief / "model.keras").exists()
    assert (chief / "checkpoints" / "last.keras").exists()
    assert not any((other / name).exists() for name in ("metrics.json", "model.keras", "checkpoints",
                                                         "tensorboard", "confusion_matrix.csv"))
    assert "0 misses" not in logs[0] and "Caching train features: 18 cache hits, 0 misses" in logs[1], \
        "the chief computed the features, the other worker read them"

    single = cli(tmp_path, "single", *[o for o in common if not o.startswith("strategy=")])
    finished(single)
    assert_same_metrics(metrics(tmp_path, "worker0"), metrics(tmp_path, "single"), tolerance=1e-4)


# TensorFlow's exact resume is in the default suite as test_run_integrity's kill-and-continue test.
@pytest.mark.parametrize("backend", [pytest.param("tensorflow", marks=pytest.mark.slow), "jax"])
def test_killed_run_resumes_at_its_last_epoch_and_ends_exactly_as_an_uninterrupted_run(backend, photo_folder,
                                                                                       tmp_path):
    common = [*EXACT, f"dataset.root={photo_folder}", "epochs=12", "optimizer=sgd",
              "optimizer.learning_rate={_target_: keras.optimizers.schedules.ExponentialDecay,"
              " initial_learning_rate: 0.05, decay_steps: 3, decay_rate: 0.8}"]
    env = {"KERAS_BACKEND": backend}
    finished(cli(tmp_path, "uninterrupted", *common, "paths.cache_dir=${paths.root}/cache_a", env=env))

    killed = cli(tmp_path, "killed", *common, env=env)
    resume_root = tmp_path / ".cache" / "resume"
    deadline = time.monotonic() + 600
    while not list(resume_root.rglob("epoch-0005.weights.h5")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()

    log = finished(cli(tmp_path, "resumed", *common, env=env))
    assert "Resuming head training at epoch" in log and f"Continuing the interrupted run in {tmp_path / 'killed'}" in log
    assert f"Keras backend: {backend}" in log
    with open(tmp_path / "killed" / "history.csv") as file:
        epochs = [int(line.split(",")[0]) for line in file.read().splitlines()[1:]]
    assert epochs == list(range(12)), "the interrupted folder holds the whole history, each epoch once"
    assert_same_metrics(metrics(tmp_path, "uninterrupted"), metrics(tmp_path, "killed"), tolerance=1e-6)
    assert not list(resume_root.rglob("*.weights.h5")), "a finished run leaves nothing to resume"


@pytest.mark.parametrize("precision", ["mixed_float16", pytest.param("mixed_bfloat16", marks=pytest.mark.slow)])
def test_mixed_precision_trains_with_float32_outputs(precision, photo_folder, tmp_path):
    cfg = compose_config([*TINY, f"dataset.root={photo_folder}", f"precision={precision}", "jit_compile=true"],
                         tmp_path)
    try:
        result = train(cfg)
        model = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(result["test/loss"])
    assert model.output.dtype == "float32", "probabilities (and the loss) stay in float32"


def test_tpu_strategy_config_names_real_classes(tmp_path):
    cfg = compose_config(["strategy=tpu"], tmp_path).strategy
    assert get_class(cfg._target_) and get_class(cfg.tpu_cluster_resolver._target_)


def test_every_precision_option_instantiates(tmp_path):
    for path in (CONF / "precision").glob("*.yaml"):
        policy = instantiate(compose_config([f"precision={path.stem}"], tmp_path).precision)
        assert policy.name == path.stem
