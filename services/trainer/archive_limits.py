"""Decompression-bomb limits of data set uploads, counted from the bytes a decompressor actually produces.

:class:`UploadLimits` (from the settings table): an archive may extract to at most
``SAMFORGE_MAX_EXTRACTED_BYTES`` and to at most ``SAMFORGE_MAX_EXTRACT_RATIO`` times its own size; each zip
entry to at most that ratio times the bytes it occupies in the archive. Ratios apply past
:data:`RATIO_GRACE_BYTES`, so a small, very repetitive file (a COCO json) passes.

Headers are never trusted. :class:`Meter` counts what is produced: the bytes written out, and for tar archives
the furthest point reached in the decompressed stream (:class:`MeteredStream`, headers included; a forward
seek decompresses everything it skips, so it is refused *before* it passes a limit, and one read is at most
:data:`MAX_READ`, since tarfile holds a pax header or long name in memory whole). A zip entry's compressed size
is bounded by where the next entry (or the central directory) starts: :func:`zip_spans`. Every refusal is
InvalidInput(field="data") naming the setting that refused it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sam_core.errors import InvalidInput
from services.common.settings import TrainerSettings

RATIO_GRACE_BYTES = 1 << 20
MAX_READ = 16 << 20
_TAR_DECOMPRESSORS: tuple[tuple[bytes, Callable[[Path], io.BufferedIOBase]], ...] = (
    (b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))
_DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may weigh, as sent and once extracted."""

    max_upload_bytes: int
    max_extracted_bytes: int
    max_ratio: float

    @staticmethod
    def from_settings(settings: TrainerSettings) -> UploadLimits:
        return UploadLimits(settings.max_upload_bytes, settings.max_extracted_bytes, settings.max_extract_ratio)


class Meter:
    """One archive's produced bytes against the limits (``archive_bytes``: its real size on disk)."""

    def __init__(self, limits: UploadLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = archive_bytes
        self.written = 0
        self.position = 0

    def count(self, *, written: int = 0, position: int = 0) -> None:
        """``written`` more bytes extracted, or the decompressed stream at (or about to reach) ``position``."""
        self.written += written
        self.position = max(self.position, position)
        self.check("the archive", max(self.written, self.position), self.archive_bytes)

    def check(self, what: str, produced: int, compressed: int) -> None:
        """InvalidInput if ``produced`` bytes from ``compressed`` bytes break a limit."""
        if produced > self.limits.max_extracted_bytes:
            raise InvalidInput(f"{what} extracts to more than {self.limits.max_extracted_bytes} bytes "
                               "(the limit SAMFORGE_MAX_EXTRACTED_BYTES)", field="data")
        if produced > RATIO_GRACE_BYTES and produced > self.limits.max_ratio * max(compressed, 1):
            raise InvalidInput(f"{what} expands more than {self.limits.max_ratio:g} times its compressed size "
                               "(the limit SAMFORGE_MAX_EXTRACT_RATIO); decompression bombs are refused", field="data")


class MeteredStream:
    """The decompressed stream of a tar archive for ``tarfile.open(fileobj=...)``, reporting to a :class:`Meter`.

    Decompressor errors become ``tarfile.ReadError`` (a corrupt archive, not a server fault).
    """

    def __init__(self, raw: io.BufferedIOBase, meter: Meter) -> None:
        self.raw = raw
        self.meter = meter

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_READ:
            raise InvalidInput(f"the archive has a header over {MAX_READ} bytes", field="data")
        try:
            data = self.raw.read(size)
        except _DECOMPRESSION_ERRORS as exc:
            raise tarfile.ReadError(f"corrupt compressed data ({type(exc).__name__})") from exc
        self.meter.count(position=self.raw.tell())
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("seek from the end of a decompressed stream")
        target = offset if whence == io.SEEK_SET else self.raw.tell() + offset
        self.meter.count(position=target)  # before seeking: the seek itself decompresses up to target
        try:
            return self.raw.seek(target)
        except _DECOMPRESSION_ERRORS as exc:
            raise tarfile.ReadError(f"corrupt compressed data ({type(exc).__name__})") from exc

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("an uploaded archive is read-only")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_tar_stream(path: Path, meter: Meter) -> MeteredStream:
    """The decompressed (gzip, bzip2, xz or plain) tar stream of the file at ``path``."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    for prefix, opener in _TAR_DECOMPRESSORS:
        if magic.startswith(prefix):
            return MeteredStream(opener(path), meter)
    return MeteredStream(open(path, "rb"), meter)  # noqa: SIM115 - closed with the stream


def zip_spans(archive: zipfile.ZipFile, archive_bytes: int) -> dict[int, int]:
    """{local header offset: bytes up to the next entry's header or the central directory}: the most compressed
    data an entry starting there can hold, whatever its header claims (entries sharing data share a span; the
    archive's overall ratio still counts every byte they produce)."""
    starts = sorted({info.header_offset for info in archive.infolist()} | {archive.start_dir, archive_bytes})
    return {start: end - start for start, end in zip(starts, starts[1:], strict=False)}
