"""Atomic file writes and content hashing: nothing half-written may ever look complete."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.

    The temporary file lives in the same folder, so the final `os.replace` is atomic: a reader sees
    either the old file, or the complete new one, never a partial write. On error it is removed. Its
    name is hidden and ends with the target's name, so writers that check suffixes (Keras wants
    `.keras` and `.weights.h5`) accept it.

    Args:
        path: the file to create or replace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name}")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise OSError(
            error.errno,
            f"Could not write {path}: {error.strerror or error}. Is the disk full or the folder "
            "read-only? Free space, or point paths.output_dir / paths.cache_dir elsewhere; "
            "files written before are intact",
        ) from error
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` as UTF-8 to `path` atomically.

    A file name that is not valid UTF-8 (kept by Python as surrogate escapes) is written back as
    its original bytes, so a path in a report still names the file.
    """
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weight files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def as_list(value: str | os.PathLike | Iterable[str] | None) -> list[str]:
    """One path (`inputs=photos/`) or a list of them (`inputs=[a.jpg,photos/]`) as a list of strings.

    A string is one item: iterating it would give its characters, each taken for a path.

    Args:
        value: a string, a path, a list or tuple (or an OmegaConf ListConfig) of them, or None.
    """
    def text(item) -> str:
        return os.fsdecode(item) if isinstance(item, (bytes, os.PathLike)) else str(item)

    if value is None:
        return []
    if isinstance(value, (str, bytes, os.PathLike)):
        return [text(value)]
    return [text(item) for item in value]
