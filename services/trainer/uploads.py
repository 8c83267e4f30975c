"""Data set uploads: a tar / zip archive streamed in chunks, extracted safely into the tenant's data folder.

The archive goes to a staging folder next to its destination (``<data>/<tenant>/uploads/.incoming-<id>/``),
is checked entry by entry *before* anything is extracted — no absolute names, no ``..``, no symbolic or hard
links, no devices / FIFOs, no duplicate names, at most :data:`MAX_ENTRIES` entries — then extracted by hand
(``O_EXCL | O_NOFOLLOW``) and renamed to ``uploads/<id>/``. A single wrapping folder (``data/images/...``) is
unwrapped. Every refusal is InvalidInput (INVALID_ARGUMENT, field ``data`` / ``filename``), including an upload
over the size limit: the caller must send something else, retrying does not help (RESOURCE_EXHAUSTED would
suggest it might). On any refusal the staging folder is removed: nothing is left on disk.

Decompression bombs: :mod:`.archive_limits` bounds the extracted bytes and the compression ratios (per zip
entry and overall), counting the bytes decompression produces, never trusting sizes declared in headers.
"""

from __future__ import annotations

import gzip
import itertools
import lzma
import os
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from sam_core.errors import InvalidInput
from services.common.interceptors import resolve_tenant

from .archive_limits import Meter, UploadLimits, open_tar_stream, zip_spans
from .job_spec import tenant_root

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
MAX_ENTRIES = 200_000
LAYOUT_NAMES = ("images", "masks", "masks_instances")  # a lone folder with one of these names is the data set
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error,
                   lzma.LZMAError, gzip.BadGzipFile, NotImplementedError)
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    tenant: str
    filename: str
    data: bytes


@dataclass(frozen=True)
class UploadResult:
    id: str  # "uploads/<id>": a data set reference for CreateJob
    bytes: int  # archive size


@dataclass(frozen=True)
class _Entry:
    path: PurePosixPath
    is_dir: bool
    size: int  # as declared
    open_data: Callable[[], IO[bytes]]  # a file entry's data (called only for files)
    compressed: int | None = None  # zip: the most bytes the entry can occupy in the archive; tar: None


def _bad(message: str, field: str = "data") -> InvalidInput:
    return InvalidInput(message, field=field)


def archive_kind(filename: str) -> str:
    """"tar" or "zip" from the file name (InvalidInput(field="filename") otherwise)."""
    lower = filename.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(ZIP_SUFFIXES):
        return "zip"
    raise _bad(f"{filename[:80]!r} is not a supported archive; use {', '.join(TAR_SUFFIXES + ZIP_SUFFIXES)}",
               "filename")


def safe_member_path(name: str) -> PurePosixPath | None:
    """A member name as a relative path inside the destination (None for "." entries), else InvalidInput."""
    if "\x00" in name:
        raise _bad(f"archive entry {name[:80]!r} has a NUL byte in its name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _bad(f"archive entry {name[:80]!r} has an absolute path")
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".")]
    if ".." in parts:
        raise _bad(f"archive entry {name[:80]!r} points outside the upload folder ('..')")
    if not parts or parts[0] == "__MACOSX":
        return None
    return PurePosixPath(*parts)


def _tar_entries(archive: tarfile.TarFile) -> Iterator[_Entry]:
    for member in archive:
        path = safe_member_path(member.name)
        if member.issym() or member.islnk():
            raise _bad(f"archive entry {member.name[:80]!r} is a link; links are not accepted")
        if not (member.isfile() or member.isdir()):
            raise _bad(f"archive entry {member.name[:80]!r} is a device, FIFO or other special file")
        if path is not None:
            yield _Entry(path, member.isdir(), member.size if member.isfile() else 0,
                         partial(_tar_data, archive, member, path))


def _tar_data(archive: tarfile.TarFile, member: tarfile.TarInfo, path: PurePosixPath) -> IO[bytes]:
    data = archive.extractfile(member)
    if data is None:
        raise _bad(f"archive entry {str(path)[:80]!r} has no data")
    return data


def _zip_entries(archive: zipfile.ZipFile, archive_bytes: int) -> Iterator[_Entry]:
    spans = zip_spans(archive, archive_bytes)
    for info in archive.infolist():
        path = safe_member_path(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _bad(f"archive entry {info.filename[:80]!r} is a link; links are not accepted")
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _bad(f"archive entry {info.filename[:80]!r} is a device, FIFO or other special file")
        if path is not None:
            yield _Entry(path, info.is_dir(), 0 if info.is_dir() else info.file_size, partial(archive.open, info),
                         compressed=min(info.compress_size, spans.get(info.header_offset, 0)))


def _name(entry: _Entry) -> str:
    return f"archive entry {str(entry.path)[:80]!r}"


def check_entries(entries: Iterable[_Entry], meter: Meter) -> list[_Entry]:
    """All entries, after the count / declared size / duplicate / file-vs-folder checks (nothing extracted yet)."""
    out: list[_Entry] = []
    files: set[PurePosixPath] = set()
    dirs: set[PurePosixPath] = set()
    declared = 0
    for entry in entries:
        out.append(entry)
        if len(out) > MAX_ENTRIES:
            raise _bad(f"the archive has more than {MAX_ENTRIES} entries")
        declared += entry.size
        meter.check("the archive", declared, meter.archive_bytes)
        if entry.compressed is not None:
            meter.check(_name(entry), entry.size, entry.compressed)
        parents = set(entry.path.parents) - {PurePosixPath(".")}
        if entry.is_dir:
            dirs.add(entry.path)
        elif entry.path in files:
            raise _bad(f"{_name(entry)} appears twice")
        else:
            files.add(entry.path)
        dirs |= parents
    clash = files & dirs
    if clash:
        raise _bad(f"archive entry {str(next(iter(clash)))[:80]!r} is both a file and a folder")
    return out


def _copy(entry: _Entry, target: Path, meter: Meter) -> None:
    """Write the entry's data to the new file ``target``, counting every block before it is written."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as handle, entry.open_data() as source:
        while block := source.read(_BLOCK):
            written += len(block)
            meter.count(written=len(block))
            if entry.compressed is not None:
                meter.check(_name(entry), written, entry.compressed)
            handle.write(block)


@contextmanager
def _open_archive(archive_path: Path, kind: str, meter: Meter) -> Iterator[tarfile.TarFile | zipfile.ZipFile]:
    if kind == "tar":
        with open_tar_stream(archive_path, meter) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            yield tar
    else:
        with zipfile.ZipFile(archive_path) as archive:
            yield archive


def extract_archive(archive_path: Path, kind: str, dest: Path, limits: UploadLimits) -> None:
    """Check every entry of the archive, then extract it into the new folder ``dest`` within ``limits``."""
    dest.mkdir()
    meter = Meter(limits, archive_path.stat().st_size)
    try:
        with _open_archive(archive_path, kind, meter) as archive:
            reader = (_tar_entries(archive) if isinstance(archive, tarfile.TarFile)
                      else _zip_entries(archive, meter.archive_bytes))
            for entry in check_entries(reader, meter):
                target = dest.joinpath(*entry.path.parts)
                if entry.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy(entry, target, meter)
    except _ARCHIVE_ERRORS as exc:
        raise _bad(f"not a readable {kind} archive ({type(exc).__name__})") from exc
    except RuntimeError as exc:  # zipfile: encrypted entries
        raise _bad(f"the {kind} archive cannot be extracted ({exc})") from exc


def _unwrap(tree: Path) -> Path:
    """The data set root: ``tree`` or its only entry if that is a folder not named like a layout part."""
    entries = list(tree.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() and \
            entries[0].name not in LAYOUT_NAMES:
        return entries[0]
    return tree


def receive_dataset(chunks: Iterable[Chunk], data_dir: str | Path, limits: UploadLimits) -> UploadResult:
    """Write the streamed archive to a staging file (at most ``limits.max_upload_bytes``), extract it safely
    within ``limits`` and publish it as ``<data_dir>/<tenant>/uploads/<id>/``; returns
    ``UploadResult("uploads/<id>", size)``."""
    stream = iter(chunks)
    first = next(stream, None)
    if first is None:
        raise _bad("the upload is empty")
    tenant = resolve_tenant(first.tenant)
    kind = archive_kind(first.filename)
    uploads = tenant_root(data_dir, tenant) / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    upload_id = uuid.uuid4().hex
    staging = uploads / f".incoming-{upload_id}"
    staging.mkdir()
    try:
        archive = staging / "archive"
        size = 0
        with open(archive, "wb") as handle:
            for chunk in itertools.chain([first], stream):
                size += len(chunk.data)
                if size > limits.max_upload_bytes:
                    raise _bad(f"the upload is larger than the limit of {limits.max_upload_bytes} bytes "
                               "(SAMFORGE_MAX_UPLOAD_BYTES)")
                handle.write(chunk.data)
        if size == 0:
            raise _bad("the upload is empty")
        extract_archive(archive, kind, staging / "tree", limits)
        root = _unwrap(staging / "tree")
        if not any(root.iterdir()):
            raise _bad("the archive holds no files")
        os.rename(root, uploads / upload_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return UploadResult(id=f"uploads/{upload_id}", bytes=size)
