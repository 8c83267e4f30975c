"""Data set uploads: unsafe archives (traversal, links, special files, clashes) and decompression bombs are
refused. The archive limits (ratio per entry and overall, extracted bytes) are checked from the bytes the
decompressor actually produces, headers are not trusted, and a refusal leaves nothing under the tenant's
uploads folder (staging included)."""

from __future__ import annotations

import functools
import gzip
import io
import os
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sam_core.errors import InvalidInput
from services.common.settings import TrainerSettings
from services.trainer.archive_limits import UploadLimits
from services.trainer.uploads import Chunk, receive_dataset
from tests.conftest import tar_bytes

MIB = 1 << 20


def _upload(tmp_path: Path, payload: bytes, filename: str = "data.tar.gz", **env: str):
    limits = UploadLimits.from_settings(TrainerSettings.from_env(env))
    chunks = [Chunk("t1", filename, payload[:MIB]), *(Chunk("", "", payload[i:i + MIB])
                                                       for i in range(MIB, len(payload), MIB))]
    return receive_dataset(chunks, tmp_path / "data", limits)


def _refused(tmp_path: Path, payload: bytes, filename: str, needle: str, **env: str) -> None:
    with pytest.raises(InvalidInput, match=needle) as info:
        _upload(tmp_path, payload, filename, **env)
    assert info.value.field == "data"
    uploads = tmp_path / "data" / "t1" / "uploads"
    assert list(uploads.iterdir()) == []  # no staging folder, no half-extracted tree


def test_upload_extracts_and_unwraps_a_single_folder(tmp_path):
    result = _upload(tmp_path, tar_bytes({"set/images/a.png": b"x", "set/masks/a.png": b"y"}))
    folder = tmp_path / "data" / "t1" / result.id
    assert result.id.startswith("uploads/") and (folder / "images" / "a.png").read_bytes() == b"x"
    assert [p.name for p in (tmp_path / "data" / "t1" / "uploads").iterdir()] == [folder.name]


@pytest.mark.parametrize(("payload", "filename", "needle"), [
    (tar_bytes({"../evil.png": b"x"}), "data.tar.gz", "outside"),
    (tar_bytes({"/etc/evil": b"x"}), "data.tgz", "absolute"),
    (tar_bytes({"images/a.png": b"x"}, symlinks={"images/b.png": "/etc/passwd"}), "data.tar.gz", "link"),
    (tar_bytes({"a/b": b"x", "a/b/c": b"y"}), "data.tar.gz", "both a file and a folder"),
    (b"not an archive at all" * 10, "data.tar.gz", "not a readable"),
    (b"\x1f\x8b" + b"not gzip data" * 10, "data.tar.gz", "not a readable"),
    (b"BZh9" + b"not bzip2 data" * 10, "data.tar.bz2", "not a readable"),
    (tar_bytes({"big.bin": bytes(5 << 20)}), "data.tar.gz", "SAMFORGE_MAX_EXTRACT_RATIO"),
])
def test_upload_refuses_unsafe_archives(tmp_path, payload, filename, needle):
    _refused(tmp_path, payload, filename, needle, SAMFORGE_MAX_UPLOAD_BYTES=str(MIB))
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "data" / "evil.png").exists()


def test_upload_refuses_zip_traversal_and_oversize(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../evil.txt", b"x")
    _refused(tmp_path, buffer.getvalue(), "data.zip", "outside")
    _refused(tmp_path, bytes(5000), "data.zip", "larger than the limit", SAMFORGE_MAX_UPLOAD_BYTES="1000")


def test_every_compression_tar_accepts_is_read(tmp_path):
    members = {"set/images/a.png": os.urandom(3000), "set/masks/a.png": b"y"}
    for mode, suffix in (("w:", "tar"), ("w:gz", "tgz"), ("w:bz2", "tar.bz2"), ("w:xz", "txz")):
        result = _upload(tmp_path, tar_bytes(members, mode=mode), f"data.{suffix}")
        assert (tmp_path / "data" / "t1" / result.id / "images" / "a.png").read_bytes() == members["set/images/a.png"]


def _zeros(total: int) -> Iterator[bytes]:
    block = bytes(MIB)
    for start in range(0, total, MIB):
        yield block[:min(MIB, total - start)]


@functools.cache
def zip_bomb(mib: int = 300) -> bytes:
    """~300 KB of zip holding one ``mib`` MiB file of zeros (sizes declared honestly)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive, \
            archive.open("images/zero.png", "w") as entry:
        for block in _zeros(mib * MIB):
            entry.write(block)
    return buffer.getvalue()


def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _tar_gz(parts: list[tuple[bytes, Iterator[bytes], int]]) -> bytes:
    """A tar.gz written block by block: (header, data blocks, data size) per member, then the end blocks."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as out:
        for header, blocks, size in parts:
            out.write(header)
            for block in blocks:
                out.write(block)
            out.write(bytes(-size % 512))
        out.write(bytes(1024))
    return buffer.getvalue()


@functools.cache
def tar_bomb(mib: int = 100) -> bytes:
    """A tar.gz holding one ``mib`` MiB file of zeros (sizes declared honestly)."""
    return _tar_gz([(_tar_header("images/zero.png", mib * MIB), _zeros(mib * MIB), mib * MIB)])


@functools.cache
def tar_header_bomb(mib: int = 64) -> bytes:
    """A tar.gz whose only file is 1 byte, behind a ``mib`` MiB pax header record (file sizes say ~nothing)."""
    size = mib * MIB
    prefix = b" comment="
    length = size
    record_head = str(length).encode() + prefix
    value = size - len(record_head) - 1

    def record() -> Iterator[bytes]:
        yield record_head
        yield from (b"x" * len(block) for block in _zeros(value))
        yield b"\n"

    return _tar_gz([(_tar_header("././@PaxHeader", size, tarfile.XHDTYPE), record(), size),
                    (_tar_header("images/a.png", 1), iter([b"x"]), 1)])


def _central_directory_field(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with the first central directory entry's 4-byte field at ``offset`` set to ``value``."""
    patched = bytearray(data)
    struct.pack_into("<I", patched, data.find(b"PK\x01\x02") + offset, value)
    return bytes(patched)


def test_a_zip_bomb_is_refused_by_its_ratio_and_leaves_nothing(tmp_path):
    """306 KB expanding to 300 MB: refused with the default limits (a 1 GiB upload limit)."""
    assert len(zip_bomb()) < 400_000
    _refused(tmp_path, zip_bomb(), "data.zip", "SAMFORGE_MAX_EXTRACT_RATIO")


def test_a_zip_entry_lying_about_its_compressed_size_is_measured_by_its_place_in_the_archive(tmp_path):
    """The bomb entry claims 5 MiB of compressed data (a 20:1 ratio); 3 MiB of random data after it keep the
    archive's overall ratio under the limit, so only the entry's real span gives it away."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("images/a.png", "w") as entry:
            for block in _zeros(100 * MIB):
                entry.write(block)
        archive.writestr(zipfile.ZipInfo("images/b.png"), os.urandom(3 * MIB), compress_type=zipfile.ZIP_STORED)
    lying = _central_directory_field(buffer.getvalue(), 20, 5 * MIB)  # compressed size
    assert zipfile.ZipFile(io.BytesIO(lying)).infolist()[0].compress_size == 5 * MIB
    _refused(tmp_path, lying, "data.zip", "images/a.png.*SAMFORGE_MAX_EXTRACT_RATIO")


def test_a_zip_entry_lying_about_its_extracted_size_is_refused(tmp_path):
    """Declared 1 KB, the data inflates to 300 MB: extraction stops at the declared size (checksum mismatch)."""
    lying = _central_directory_field(zip_bomb(), 24, 1000)  # uncompressed size
    _refused(tmp_path, lying, "data.zip", "not a readable zip archive")


def test_a_tar_gz_bomb_is_refused(tmp_path):
    _refused(tmp_path, tar_bomb(), "data.tar.gz", "SAMFORGE_MAX_EXTRACT_RATIO")


@pytest.mark.parametrize(("mib", "needle"), [(12, "SAMFORGE_MAX_EXTRACT_RATIO"), (64, "header over")])
def test_a_tar_gz_whose_headers_expand_is_refused_while_decompressing(tmp_path, mib, needle):
    """File sizes declare 1 byte; the decompressed stream is a pax header of ``mib`` MiB, which tarfile would
    hold in memory: counted as it streams, and never read whole past 16 MiB."""
    _refused(tmp_path, tar_header_bomb(mib), "data.tgz", needle)


def test_the_extracted_size_limit_applies_to_ordinary_compression(tmp_path):
    """3 MiB of 2-bit noise (4:1) under a 2 MiB extraction limit."""
    noise = bytes(b & 3 for b in os.urandom(3 * MIB))
    payload = _tar_gz([(_tar_header("images/a.png", len(noise)), iter([noise]), len(noise))])
    _refused(tmp_path, payload, "data.tar.gz", "SAMFORGE_MAX_EXTRACTED_BYTES",
             SAMFORGE_MAX_UPLOAD_BYTES=str(2 * MIB), SAMFORGE_MAX_EXTRACTED_BYTES=str(2 * MIB))
    assert _upload(tmp_path, payload, "data.tar.gz", SAMFORGE_MAX_UPLOAD_BYTES=str(2 * MIB),
                   SAMFORGE_MAX_EXTRACTED_BYTES=str(4 * MIB)).id.startswith("uploads/")


def test_small_well_compressed_files_are_accepted(tmp_path):
    """A COCO json compresses far beyond the ratio limit; under the grace size that is fine."""
    coco = b'{"annotations": [' + b'{"segmentation": [[1, 2, 3, 4]], "category_id": 1}, ' * 10_000 + b"{}]}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("set/train.json", coco)
        archive.writestr("set/images/a.png", os.urandom(1000))
    assert len(coco) > 100 * len(buffer.getvalue())
    result = _upload(tmp_path, buffer.getvalue(), "data.zip")
    assert (tmp_path / "data" / "t1" / result.id / "train.json").read_bytes() == coco


@pytest.mark.parametrize(("env", "variable"), [
    ({"SAMFORGE_MAX_UPLOAD_BYTES": str(4 * MIB), "SAMFORGE_MAX_EXTRACTED_BYTES": str(2 * MIB)},
     "SAMFORGE_MAX_EXTRACTED_BYTES"),
    ({"SAMFORGE_MAX_EXTRACT_RATIO": "1"}, "SAMFORGE_MAX_EXTRACT_RATIO"),
    ({"SAMFORGE_MAX_EXTRACT_RATIO": "nan"}, "SAMFORGE_MAX_EXTRACT_RATIO"),
])
def test_archive_limits_are_checked_at_start_up(env, variable):
    with pytest.raises(InvalidInput) as info:
        TrainerSettings.from_env(env)
    assert info.value.field == variable
