"""File safety: atomic replacement of a file, durable folder publish, fsync and streamed sha256.

The one place samforge writes files that must survive a crash whole or not at all.

* :func:`atomic_write_bytes`, :func:`atomic_write_text` and :func:`atomic_output` replace a file
  atomically: the new content goes to a temporary file in the destination's directory (named
  ``.<name>.<random>.tmp``, see :func:`is_temporary`), is flushed and fsynced, gets its permission
  ``mode`` and is renamed over the destination with ``os.replace``; then the directory is fsynced so
  the rename itself is durable. A reader sees the old file or the new one, never a partial one. If
  anything fails before the rename, the temporary file is removed and the old file is untouched; a
  crash (no chance to clean up) can leave a stray temporary file, never a half-written destination.
  The destination's directory must exist.
* :func:`publish_dir` makes a staged folder appear under its final name completely or not at all:
  every file in it and the folder are fsynced, the folder is renamed, both parents are fsynced.
* :func:`fsync_file`, :func:`fsync_dir`, :func:`fsync_tree` and :func:`rename_durably` are the steps,
  for callers that must run them at different times (e.g. fsync outside a lock, rename inside it).
* :func:`file_sha256` hashes a file in 1 MiB blocks, never reading it whole.

Errors are ``OSError`` from the operating system, unchanged. The only one swallowed is a file system
refusing to fsync a directory at all (``EINVAL`` / ``ENOTSUP``), which is no failure of the write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeAlias

TEMP_SUFFIX = ".tmp"
"""Suffix of the temporary files of the atomic writers (their names also start with a dot)."""

DEFAULT_MODE = 0o644
"""Permission bits of files written by the atomic writers unless a caller asks for others."""

HASH_BLOCK_SIZE = 1 << 20
"""Bytes read at a time by :func:`file_sha256`."""

_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})

PathLike: TypeAlias = str | os.PathLike[str]


def is_temporary(path: PathLike) -> bool:
    """True if ``path``'s name is that of an atomic writer's temporary file (``.<name>.<random>.tmp``)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (creations, renames, deletions in it) to stable storage.

    A file system that cannot fsync directories (``EINVAL`` / ``ENOTSUP``) is tolerated; any other
    ``OSError`` (e.g. the directory does not exist) is raised.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """fsync every regular file under ``folder`` (recursively, symlinks not followed), then each folder."""
    with os.scandir(folder) as entries:
        children = list(entries)
    for entry in children:
        if entry.is_dir(follow_symlinks=False):
            fsync_tree(entry.path)
        elif entry.is_file(follow_symlinks=False):
            fsync_file(entry.path)
    fsync_dir(folder)


def rename_durably(source: PathLike, target: PathLike) -> None:
    """``os.rename(source, target)``, then fsync the target's parent (and the source's, if another)."""
    source_path, target_path = Path(source), Path(target)
    os.rename(source_path, target_path)
    fsync_dir(target_path.parent)
    if source_path.parent.resolve() != target_path.parent.resolve():
        fsync_dir(source_path.parent)


def publish_dir(staged: PathLike, target: PathLike) -> None:
    """Make the folder ``staged`` appear as ``target`` completely or not at all.

    Its files and folders are fsynced, then it is renamed (same file system; like ``os.rename``, an
    existing non-empty ``target`` is an error) and the parents are fsynced.
    """
    fsync_tree(staged)
    rename_durably(staged, target)


def _temporary_next_to(target: Path) -> tuple[int, Path]:
    """A new private (0600) temporary file in ``target``'s directory: (open descriptor, path)."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    return fd, Path(name)


def _move_into_place(temporary: Path, target: Path, mode: int) -> None:
    """chmod + os.replace a fully written, fsynced temporary file onto ``target``; fsync the directory."""
    try:
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes, *, mode: int = DEFAULT_MODE) -> None:
    """Atomically replace (or create) ``path`` with ``data`` (see the module docstring)."""
    target = Path(path)
    fd, temporary = _temporary_next_to(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _move_into_place(temporary, target, mode)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8", mode: int = DEFAULT_MODE) -> None:
    """Atomically replace (or create) ``path`` with ``text`` encoded as ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding), mode=mode)


@contextmanager
def atomic_output(path: PathLike, *, mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a file name (``torch.save``, ``torch.onnx.export``).

    When the block ends normally the file written there is fsynced and atomically moved to ``path``;
    when it raises, the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    fd, temporary = _temporary_next_to(target)
    os.close(fd)
    try:
        yield temporary
        fsync_file(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _move_into_place(temporary, target, mode)


def file_sha256(path: PathLike) -> str:
    """Lowercase hex sha256 of a file's bytes, read in :data:`HASH_BLOCK_SIZE` blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()
