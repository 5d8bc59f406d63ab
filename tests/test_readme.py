"""Every command in README.md's bash blocks is checked here, so the README cannot drift from the code.

Each command is checked as cheaply as what it would do allows (a README command may train for an
hour or need VOC on disk); a command no rule below knows fails the test, so a new README command
gets a rule before it is merged:

- `python train.py ...`, `predict.py`, `annotate.py`: composed from the real conf/ exactly as the
  script would (every job of a `-m` sweep, also each job of a `sweep=` recipe's grid), then
  `pipeline.checks.check_train_config`'d for train.py, with `/data/...` roots made as the smallest
  layout their dataset's early check accepts (two class folders with a file each; VOC's folders and id
  lists; COCO's annotation files and image folders; nothing is opened). Not trained: the other tests
  train every task. `--help` runs the script itself.
- `make TARGET`: the target exists in the Makefile (it installs a fresh environment: CI runs
  `make test` itself, and `make demo` is `python train.py`, covered above).
- `.venv/bin/python bench/X.py ARGS`: ARGS are parsed by the script's own argparse parser; the
  benchmark is not run (3 to 12 minutes each).
- `.venv/bin/python -m pytest -m MARK`: MARK is registered in pyproject.toml (this is the suite).
- `tensorboard --logdir DIR`: TensorBoard is installed and DIR is a folder runs write.
- `python export.py ARGS`: composed from conf/export.yaml; `formats` are known formats.
- `pipeline-X ARGS` (the installed apps): the entry point is declared in pyproject.toml and names an
  app of pipeline/apps.py; ARGS compose as for the checkout's script (unless `--config-dir` points
  at the user's own folder). `pip install PATH`: tests/test_packaging.py (slow) installs the
  checkout into a fresh environment and runs `pipeline-train` from an empty folder.
- The Keras ```python block runs, with a model.keras exported by a tiny run and a real photo (the
  onnxruntime one runs in tests/test_export.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import OmegaConf, open_dict

from pipeline.checks import check_train_config
from tests.conftest import CONF, TINY, compose_config

ROOT = CONF.parent
README = ROOT / "README.md"
SCRIPTS = {"train.py": "train", "predict.py": "predict", "annotate.py": "annotate"}
APPS = {"pipeline-train": "train.py", "pipeline-predict": "predict.py", "pipeline-annotate": "annotate.py",
        "pipeline-export": "export.py"}


def fenced_blocks(text: str, language: str) -> list[str]:
    """The contents of every ```language block."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks: continuation lines joined, `&&` chains split."""
    commands = []
    for block in fenced_blocks(README.read_text(encoding="utf-8"), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands += [" ".join(shlex.quote(word) for word in part)
                             for part in _split_on(words, "&&")]
    return commands


def _split_on(words: list[str], separator: str) -> list[list[str]]:
    parts = [[]]
    for word in words:
        if word == separator:
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


def program_and_arguments(command: str) -> tuple[str, list[str]]:
    """(`train.py`, its arguments) for `[ENV=x] python|.venv/bin/python|python3 train.py ...`; else
    (first word, the rest)."""
    words = shlex.split(command.replace("<date>/<time>", "2026-01-01/12-00-00"))  # a run folder's name
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # TF_CONFIG=... KERAS_BACKEND=...
        words = words[1:]
    if words[0] in ("python", "python3", ".venv/bin/python"):
        if words[1] == "-m":
            return f"-m {words[2]}", words[3:]
        return words[1], words[2:]
    return words[0], words[1:]


def job_overrides(arguments: list[str]) -> list[list[str]]:
    """Every job's overrides: one job, or each point of a `-m` sweep's grid."""
    arguments = [argument for argument in arguments if argument not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(arguments)
    choices = [[override.input_line] if not override.is_sweep_override()
               else [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
               if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP)
               else [f"{override.get_key_element()}={override.value().start}"]  # Optuna's interval: its start
               for override in parsed]
    return [list(job) for job in itertools.product(*choices)]


def with_data_roots(overrides: list[str], tmp_path: Path) -> list[str]:
    """`/data/...` placeholders made into empty folders under tmp_path (their contents are not read)."""
    rewritten = []
    for override in overrides:
        key, _, value = override.partition("=")
        if value.startswith("/data/") or value.startswith("/tmp/photos"):
            folder = tmp_path / value.lstrip("/")
            if "." in folder.name:  # a file such as vgg_16.ckpt
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.touch()
            else:
                folder.mkdir(parents=True, exist_ok=True)
            value = str(folder)
        rewritten.append(f"{key}={value}")
    return rewritten


def make_placeholder_layout(dataset, tmp_path: Path) -> None:
    """A placeholder root under tmp_path given the files its dataset class needs, as empty files.

    `check_train_config` lists the data set's folders before TensorFlow loads (it opens no image), so a
    placeholder must have the layout of its kind: that check is part of what a README command runs.
    """
    root = dataset.get("root")
    if not isinstance(root, str) or tmp_path not in Path(root).parents:
        return
    root, kind = Path(root), dataset["_target_"].rsplit(".", 1)[1]
    if kind == "ImageFolder":
        for name in ("class_a", "class_b"):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "image.jpg").touch()
    elif kind == "VOCSegmentation":
        for folder in ("JPEGImages", "SegmentationClass"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        for source in (source for sources in dataset.splits.values() for source in sources):
            list_kind, name = source.split("/")
            folder = root / "ImageSets" / "Segmentation" if list_kind == "voc" else Path(dataset.sbd_root)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").touch()
    elif kind == "COCOSegmentation":
        for spec in dataset.splits.values():
            (root / spec.annotations).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.annotations).touch()
            (root / spec.images).mkdir(parents=True, exist_ok=True)


def compose(config_name: str, overrides: list[str], tmp_path: Path):
    """The real conf/<config_name>.yaml with `overrides`, folders under tmp_path, and its sweeper's
    `params` (a recipe's grid), from Hydra's own config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, return_hydra_config=True, overrides=[
            f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
            *([f"paths.resume_dir={tmp_path / 'resume'}"] if config_name == "train" else []), *overrides])
    params = cfg.hydra.sweeper.get("params")
    with open_dict(cfg):
        del cfg["hydra"]  # values only a running job has (hydra.job.num): the run's config is the rest
    return cfg, OmegaConf.to_container(params) if params else {}


def compose_train_jobs(arguments: list[str], tmp_path: Path) -> int:
    """Composes and checks every job of a train.py command (a recipe's grid too); returns how many."""
    jobs = 0
    for overrides in job_overrides(arguments):
        overrides = with_data_roots(overrides, tmp_path)
        cfg, params = compose("train", overrides, tmp_path)
        grid = [f"{key}={value}" for key, value in params.items()] if "-m" in arguments else []
        for job in job_overrides(grid) if grid else [[]]:
            job_cfg = compose("train", [*overrides, *job], tmp_path)[0] if job else cfg
            make_placeholder_layout(job_cfg.dataset, tmp_path)
            check_train_config(job_cfg)
            jobs += 1
    return jobs


def compose_tool(config_name: str, arguments: list[str], tmp_path: Path) -> None:
    cfg, _ = compose(config_name, with_data_roots(arguments, tmp_path), tmp_path)
    assert cfg.backbone.name and OmegaConf.missing_keys(cfg) == set()


def parse_bench_arguments(script: Path, arguments: list[str], monkeypatch) -> argparse.Namespace:
    """The script's own parser applied to `arguments`; stops before the benchmark runs."""

    class Parsed(Exception):
        pass

    real_parse_args = argparse.ArgumentParser.parse_args
    parsed = {}

    def parse_and_stop(parser, args=None, namespace=None):
        parsed["args"] = real_parse_args(parser, arguments, namespace)
        raise Parsed

    spec = importlib.util.spec_from_file_location(f"readme_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(script.parent))
    environment = dict(os.environ)  # a script may set variables at import (gpu_throughput: KERAS_BACKEND=jax)
    try:
        spec.loader.exec_module(module)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        with pytest.raises(Parsed):
            module.main()
    finally:  # later tests start train.py processes that inherit this process's environment
        os.environ.clear()
        os.environ.update(environment)
    return parsed["args"]


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) > 30 and any("train.py" in command for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, tmp_path, monkeypatch):
    program, arguments = program_and_arguments(command)
    if program in APPS:
        import pipeline.apps

        scripts = (ROOT / "pyproject.toml").read_text()
        function = program.removeprefix("pipeline-")
        assert f'{program} = "pipeline.apps:{function}"' in scripts and callable(getattr(pipeline.apps, function))
        if "--config-dir" in arguments:
            return  # the user's own config folder: nothing here to compose
        program = APPS[program]
    if program in SCRIPTS and arguments and arguments[0] in ("--help", "--cfg"):
        result = subprocess.run([sys.executable, program, *arguments], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and ("backbone" in result.stdout), result.stderr[-2000:]
    elif program == "train.py":
        assert compose_train_jobs(arguments, tmp_path) >= 1
    elif program in SCRIPTS:
        compose_tool(SCRIPTS[program], arguments, tmp_path)
    elif program == "export.py":
        from pipeline.export import FORMATS

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(config_name="export", overrides=[*arguments, f"paths.output_dir={tmp_path}"])
        assert cfg.run_dir and set(cfg.formats) <= set(FORMATS), OmegaConf.to_container(cfg)
    elif program == "pip" and arguments[0] == "install":
        packaging_test = (ROOT / "tests" / "test_packaging.py").read_text()
        assert "pipeline-train" in packaging_test and "venv" in packaging_test
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert set(arguments) <= set(targets), f"make {arguments}: the Makefile has {targets}"
    elif program.startswith("bench/"):
        parse_bench_arguments(ROOT / program, arguments, monkeypatch)
    elif program == "-m pytest":
        markers = (ROOT / "pyproject.toml").read_text()
        mark = arguments[arguments.index("-m") + 1]
        assert re.search(rf'^\s*"{mark}:', markers, flags=re.M), f"pytest marker {mark!r} is not registered"
    elif program == "tensorboard":
        assert importlib.util.find_spec("tensorboard.main"), "tensorboard (its command's module) is not installed"
        logdir = arguments[arguments.index("--logdir") + 1]
        assert logdir in ("outputs", "multirun"), f"--logdir {logdir}: a folder runs write (outputs, multirun)"
    else:
        pytest.fail(f"No rule checks the README command {command!r}: add one to {__file__}.")


def test_the_readme_python_example_runs_on_an_exported_model(photo_folder, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    # The Keras one; the onnxruntime snippet runs in tests/test_export.py on an exported run.
    (example,) = [block for block in fenced_blocks(README.read_text(encoding="utf-8"), "python")
                  if "keras.saving.load_model" in block]
    task = instantiate(compose_config([*TINY, f"dataset.root={photo_folder}"], tmp_path).task)
    model_path = tmp_path / "model.keras"
    task.export_model(task.build_model()).save(model_path)
    photo = next((photo_folder / "coffee").glob("*.jpg"))
    code = example.replace("outputs/<date>/<time>/model.keras", str(model_path)).replace("photo.jpg", str(photo))
    assert code != example, "the example's paths changed: update the substitutions above"
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["probabilities"].shape == (3,)
    assert abs(float(namespace["probabilities"].sum()) - 1) < 1e-5
