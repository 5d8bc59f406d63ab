"""Ctrl-C and SIGTERM stop a run with one line that says what is kept and how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.plugins.hparams import api_pb2

from tests.conftest import CONF, TINY
from tests.test_hparams import session


def start(photo_folder, tmp_path, name, backend):
    command = [sys.executable, "train.py", *TINY, f"dataset.root={photo_folder}", "epochs=100000",
               "task=classification", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path / name}"]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT: restore it,
    # so the test means the same wherever pytest runs.
    return subprocess.Popen(command, cwd=CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KERAS_BACKEND": backend},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow  # two training processes: 2 minutes on 2 shared cores
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])  # under JAX the signal arrives inside jitted steps
def test_ctrl_c_and_sigterm_print_one_line_and_end_by_their_signal(backend, photo_folder, tmp_path):
    runs = {number: start(photo_folder, tmp_path, number.name, backend) for number in (signal.SIGINT, signal.SIGTERM)}
    folders = {number: tmp_path / number.name for number in runs}
    deadline = time.monotonic() + 300
    waiting = dict(runs)
    while waiting and time.monotonic() < deadline:  # each stops once it has finished two epochs
        for number, process in list(waiting.items()):
            history = folders[number] / "history.csv"
            if process.poll() is not None or (history.exists() and len(history.read_text().splitlines()) > 2):
                process.send_signal(number)
                del waiting[number]
        time.sleep(0.5)
    for number, process in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == -number, (process.returncode, stderr[-3000:])  # the shell's 130 / 143
        assert "Traceback" not in stderr and f"Keras backend: {backend}" in stderr, stderr[-3000:]
        how = "Ctrl-C" if number == signal.SIGINT else "SIGTERM"
        lines = [line for line in stderr.splitlines() if "Interrupted by" in line]
        assert len(lines) == 1 and how in lines[0] and "run the same command again to resume" in lines[0], stderr
        assert "checkpoints/last.keras" in lines[0]
        assert not (folders[number] / "metrics.json").exists()
        _, status = session(folders[number] / "tensorboard")
        assert status == api_pb2.STATUS_FAILURE  # TensorBoard has no status for "interrupted"
