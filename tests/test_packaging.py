"""`pip install <repo>` gives working commands: from a fresh virtual environment, in an empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONF

REPOSITORY = CONF.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new venv holding the project installed from a wheel of this checkout, no checkout on its path.

    Its dependencies (TensorFlow and the rest, gigabytes) are borrowed from this environment through a
    .pth file that lists this environment's site-packages folders after the venv's own, so the project
    itself can only come from the wheel.
    """
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    borrowed = [path for path in sys.path if path.endswith("site-packages")]
    (site / "zz-borrowed-dependencies.pth").write_text("\n".join(borrowed) + "\n")
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(REPOSITORY)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv / "bin"


def run(bin_dir: Path, folder: Path, *arguments: str, timeout: int = 900) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(bin_dir / arguments[0]), *arguments[1:]], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_every_python_package_of_the_checkout_is_listed_for_the_wheel():
    import tomllib

    listed = set(tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(REPOSITORY).parts)
             for top in ("pipeline", "hydra_plugins") for path in (REPOSITORY / top).rglob("*.py")
             if "__pycache__" not in path.parts}
    assert found - listed == set(), "add them to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"pipeline.conf"}, "conf/ is carried as pipeline/conf"


@pytest.mark.slow  # a venv, a wheel build and a tiny run on the 456 demo photos: a few minutes
def test_the_installed_train_command_trains_the_embedded_default_from_an_empty_folder(installed, tmp_path):
    where = run(installed, tmp_path, "python", "-c", "import pipeline, pipeline.apps; print(pipeline.__file__, "
                "pipeline.apps.CONFIG_PATH)")
    module, config_path = where.stdout.split()
    package = Path(module).parent
    assert package.is_relative_to(installed.parent) and config_path == str(package / "conf"), where.stdout

    result = run(installed, tmp_path, "pipeline-train", "debug=tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/accuracy" in result.stdout
    metrics, = tmp_path.glob("outputs/*/*/metrics.json")
    assert json.loads(metrics.read_text())["test/examples"] > 0
    assert (tmp_path / "datasets" / "demo").is_dir() and (tmp_path / ".cache" / "weights").is_dir()


@pytest.mark.slow
def test_the_installed_commands_read_the_packaged_configs_and_a_config_dir(installed, tmp_path):
    (tmp_path / "mine" / "dataset").mkdir(parents=True)
    (tmp_path / "mine" / "dataset" / "birds.yaml").write_text(
        "defaults:\n  - folder\nroot: /data/birds\nvalidation_percent: 20\n")
    result = run(installed, tmp_path, "pipeline-train", "--config-dir", "mine", "dataset=birds", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "root: /data/birds" in result.stdout and "validation_percent: 20" in result.stdout
    for command, expected in (("pipeline-predict", "top_k: 5"), ("pipeline-annotate", "pooling_window: 7")):
        result = run(installed, tmp_path, command, "inputs=photo.jpg", "--cfg", "job")
        assert result.returncode == 0 and expected in result.stdout, result.stderr[-3000:]
    help_text = run(installed, tmp_path, "pipeline-train", "--help").stdout
    assert "backbone: efficientnet_b0, efficientnet_lite0" in help_text
