"""What the benchmarks share: a subset of a folder-per-class image set, and the machine line of a table."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def subset(source: str | Path, target: Path, images: int, extensions: tuple[str, ...] | None = None) -> Path:
    """Copies `images` files of a folder-per-class set into `target`, taking one from each class in turn.

    Args:
        source: the set, e.g. the embedded demo photos (`pipeline.demo.ensure_demo_folder`).
        target: the new folder.
        images: how many files to copy.
        extensions: only files with these suffixes (lower case, with the dot); None: all files.
    """
    classes = [sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                      and (extensions is None or p.suffix.lower() in extensions))
               for folder in sorted(p for p in Path(source).iterdir() if p.is_dir())]
    order = [files[rank] for rank in range(max(map(len, classes))) for files in classes if rank < len(files)]
    if len(order) < images:
        raise ValueError(f"{source} holds {len(order)} such images; ask for at most that many with --images.")
    for path in order[:images]:
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.parent.name / path.name)
    return target


def machine(**versions: str) -> str:
    """`# host x86_64 2 CPUs | python 3.11.7 | tensorflow 2.21.0 | keras 3.15.1`: the table's second line.

    Args:
        **versions: package name -> version, in the order to print.
    """
    packages = "".join(f" | {name} {version}" for name, version in versions.items())
    return (f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs | python {platform.python_version()}"
            f"{packages}")


def add_backend_arguments(parser) -> None:
    """`--backends` (each measured in its own process) and `--json` (how `times_per_backend` calls back)."""
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"], choices=["tensorflow", "jax"],
                        help="Keras backends, each measured in its own process")
    parser.add_argument("--json", action="store_true", help="measure under KERAS_BACKEND; print times as JSON")


def times_per_backend(script: str, argv: list[str], backends: list[str]) -> dict[str, dict[str, list[float]]]:
    """Runs `script argv --json` once per Keras backend (fixed at import, so a process each).

    Args:
        script: the benchmark's own file; with `--json` it measures and prints one JSON line of times.
        argv: its command-line arguments.
        backends: `KERAS_BACKEND` values, e.g. ["tensorflow", "jax"].

    Returns:
        backend -> run name -> seconds.
    """
    import json
    import subprocess
    import sys

    results = {}
    for backend in backends:
        result = subprocess.run([sys.executable, script, *argv, "--json"], capture_output=True, text=True,
                                env={**os.environ, "KERAS_BACKEND": backend})
        if result.returncode != 0:
            raise RuntimeError(f"{script} under KERAS_BACKEND={backend} failed:\n{result.stderr[-3000:]}")
        results[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    return results


def jax_version() -> str:
    """JAX's version, or "absent"."""
    try:
        import importlib.metadata

        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return "absent"
