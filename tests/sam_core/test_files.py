"""Tests of sam_core.files: atomic writes, durable publish of a staged folder, fsync and sha256."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from sam_core import files


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    files.atomic_write_bytes(target, b"old")
    files.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["index.json"]
    assert stat.S_IMODE(target.stat().st_mode) == files.DEFAULT_MODE
    files.atomic_write_text(target, "caf\u00e9\n", mode=0o600)
    assert target.read_text(encoding="utf-8") == "caf\u00e9\n" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_atomic_write_fsyncs_the_file_then_the_directory(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "job.json"
    files.atomic_write_bytes(target, b"{}")
    assert len(fsynced) == 2
    assert files.is_temporary(fsynced[0]) and Path(fsynced[0]).parent == tmp_path.resolve()
    assert fsynced[1] == str(tmp_path.resolve())


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           failing: str) -> None:
    target = tmp_path / "entry.bin"
    files.atomic_write_bytes(target, b"old contents")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    real_fdopen = os.fdopen

    def full_disk_fdopen(fd: int, mode: str) -> object:
        handle = real_fdopen(fd, mode)

        def half_write(data: bytes) -> int:
            handle.raw.write(data[: len(data) // 2])  # half lands in the temporary file, then the disk is full
            raise OSError("disk on fire")

        handle.write = half_write
        return handle

    if failing == "write":
        monkeypatch.setattr(files.os, "fdopen", full_disk_fdopen)
    elif failing == "fsync":
        monkeypatch.setattr(files.os, "fsync", broken)  # the file's own fsync, after the data went out
    else:
        monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(OSError, match="disk on fire"):
        files.atomic_write_bytes(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents" and _names(tmp_path) == ["entry.bin"]


def test_atomic_output_for_writers_that_need_a_file_name(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "model.onnx"
    with files.atomic_output(target) as temporary:
        assert temporary.parent == tmp_path and files.is_temporary(temporary) and not target.exists()
        temporary.write_bytes(b"graph")
    assert target.read_bytes() == b"graph" and _names(tmp_path) == ["model.onnx"]
    assert fsynced == [str(tmp_path.resolve() / temporary.name), str(tmp_path.resolve())]
    assert stat.S_IMODE(target.stat().st_mode) == files.DEFAULT_MODE


def test_atomic_output_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old graph")
    with pytest.raises(RuntimeError, match="export failed"), files.atomic_output(target) as temporary:
        temporary.write_bytes(b"half a graph")
        raise RuntimeError("export failed")
    assert target.read_bytes() == b"old graph" and _names(tmp_path) == ["model.onnx"]


def test_fsync_dir_tolerates_only_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(files.os, "fsync", unsupported)
    files.fsync_dir(tmp_path)  # a file system that cannot sync directories is no error
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        files.fsync_dir(tmp_path / "missing")


def test_publish_dir_fsyncs_everything_then_renames(tmp_path: Path, fsynced: list[str]) -> None:
    staged = tmp_path / ".staging" / "tmp-1"
    (staged / "sub").mkdir(parents=True)
    (staged / "a.json").write_text("{}")
    (staged / "sub" / "b.bin").write_bytes(b"b")
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "v1"
    files.publish_dir(staged, target)
    assert not staged.exists() and _names(target) == ["a.json", "sub"] and (target / "sub" / "b.bin").is_file()
    root = tmp_path.resolve()
    assert sorted(fsynced[:4]) == sorted(str(root / ".staging" / "tmp-1" / p) for p in ("a.json", "sub/b.bin",
                                                                                        "sub", ""))
    assert fsynced[3] == str(root / ".staging" / "tmp-1")  # the folder after its contents
    assert fsynced[4:] == [str(root / "out"), str(root / ".staging")]


def test_rename_durably_in_one_directory_fsyncs_it_once(tmp_path: Path, fsynced: list[str]) -> None:
    (tmp_path / "a").mkdir()
    files.rename_durably(tmp_path / "a", tmp_path / "b")
    assert _names(tmp_path) == ["b"] and fsynced == [str(tmp_path.resolve())]


def test_file_sha256_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.bin"
    data = os.urandom(3 * 1000 + 7)
    path.write_bytes(data)
    monkeypatch.setattr(files, "HASH_BLOCK_SIZE", 1000)
    assert files.file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert files.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_is_temporary() -> None:
    assert files.is_temporary("/x/.job.json.abc123.tmp")
    assert not files.is_temporary("/x/job.json") and not files.is_temporary("/x/notes.tmp")
