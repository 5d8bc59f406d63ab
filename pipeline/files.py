"""Atomic file writes and content hashing: nothing half-written may ever look complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
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


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20, max_bytes: int | None = None) -> str:
    """Hex sha256 of a file, read in chunks so large weight files need little memory.

    Only a regular file is read (after symbolic links): a FIFO would block forever and `/dev/zero`
    never ends. Both raise `OSError` with the reason instead, as does a file over `max_bytes`.

    Args:
        path: the file.
        chunk_size: bytes read at a time.
        max_bytes: refuse larger files (None: any size).
    """
    with open(path, "rb", opener=_regular_file_opener) as file:
        size = os.fstat(file.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes ({size})", str(path))
        digest = hashlib.sha256()
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def not_regular_reason(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file one can read ("a FIFO", "a device", ...), or None if it is one.

    Follows symbolic links, without opening the file (opening a FIFO blocks until a writer comes).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return error.strerror or str(error)
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a file")
    return f"not a regular file ({kind})"


def _regular_file_opener(path: str, flags: int) -> int:
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; the check below refuses it.
    descriptor = os.open(path, flags | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, not_regular_reason(path) or "not a regular file", str(path))
    os.set_blocking(descriptor, True)
    return descriptor


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
