"""Run folders that describe exactly one run: locked while a process owns one, older runs set aside.

A run folder is *owned* by the process that holds the `flock` on its `.lock` file; the kernel drops the
lock when the process ends in any way (exit, exception, SIGKILL), so a lock can never go stale. Two
runs therefore never write into one folder, and a sweep launcher can see that a job is still running.
A folder that already holds another run's outputs gets them moved into `previous-N/` before the new
run writes, so `metrics.json`, `history.csv` and TensorBoard events always belong to one run. Until
it finishes, a run's folder holds `unfinished.txt`, which says what to do if the run was interrupted.

No TensorFlow here: the sweep launcher imports this module.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

LOCK = ".lock"
UNFINISHED = "unfinished.txt"
FINISHED_MARKERS = ("metrics.json", "error.txt")
# Written by Hydra before the run starts (config, overrides, the job's log) or by this module: kept in place.
_KEPT = {".hydra", LOCK, UNFINISHED}

_held: dict[Path, int] = {}  # folder -> open lock file descriptor, for the life of the process


class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder."""


def lock_folder(folder: str | os.PathLike) -> None:
    """Makes this process the owner of `folder` until it ends; refuses if another process owns it.

    Args:
        folder: a run folder (created if needed).

    Raises:
        RunFolderBusy: another live process holds the folder.
    """
    folder = Path(folder).absolute()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        owner = folder_owner(folder)
        raise RunFolderBusy(
            f"Run folder {folder} is in use by another run (process {owner or 'unknown'}). Wait for it "
            "to end, or give this run another folder (leave hydra.run.dir at its default)."
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    _held[folder] = descriptor


def release_folder(folder: str | os.PathLike) -> None:
    """Gives up this process's ownership of `folder` (before removing it, so no stale lock is kept)."""
    descriptor = _held.pop(Path(folder).absolute(), None)
    if descriptor is not None:
        os.close(descriptor)


def folder_owner(folder: str | os.PathLike) -> int | None:
    """The process id that owns `folder` now, or None when no live process does.

    Args:
        folder: a run folder.
    """
    path = Path(folder) / LOCK
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def run_outputs(folder: str | os.PathLike) -> list[Path]:
    """What a run wrote into `folder` (everything but Hydra's files, logs, the lock and older runs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir()
                  if path.name not in _KEPT and not path.name.endswith(".log")
                  and not path.name.startswith("previous-"))


def set_aside(folder: str | os.PathLike) -> Path | None:
    """Moves an older run's outputs in `folder` into `folder/previous-N/`; returns it (None: nothing to move).

    Args:
        folder: the run folder a new run is about to write into.
    """
    folder = Path(folder)
    outputs = run_outputs(folder)
    if not outputs:
        return None
    number = 1
    while (folder / f"previous-{number}").exists():
        number += 1
    destination = folder / f"previous-{number}"
    destination.mkdir()
    for path in outputs:
        os.replace(path, destination / path.name)
    return destination


def mark_unfinished(folder: str | os.PathLike, command: str) -> None:
    """Writes `unfinished.txt`: until `mark_finished`, the folder says it holds no finished run."""
    (Path(folder) / UNFINISHED).write_text(
        f"This run has not finished (it has no metrics.json). If no process is running in this folder\n"
        f"(`.lock` is free), it was interrupted: run the same command again and it continues here from\n"
        f"its last saved epoch.\n\ncommand: {command}\n"
    )


def mark_finished(folder: str | os.PathLike) -> None:
    (Path(folder) / UNFINISHED).unlink(missing_ok=True)


def folder_fingerprint(root: str | os.PathLike | None) -> str:
    """sha256 over every regular file's relative path, size and modification time under `root`.

    Replacing, adding, removing or editing a file changes it; hidden files and folders (caches) are
    left out. Reads no file contents, so it costs one `stat` per file.

    Args:
        root: a data set folder (None or a missing folder: the fingerprint of nothing).
    """
    digest = hashlib.sha256()
    if root is None or not os.path.isdir(root):
        return digest.hexdigest()
    for directory, folders, names in os.walk(root, followlinks=False):
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            try:
                status = os.stat(path)
            except OSError:
                continue
            relative = os.path.relpath(path, root)
            digest.update(json.dumps([relative, status.st_size, status.st_mtime_ns, status.st_mode]).encode(
                "utf-8", "surrogateescape"))
    return digest.hexdigest()

