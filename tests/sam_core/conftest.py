"""Fixtures shared by the sam_core tests."""

from __future__ import annotations

import os

import pytest

from sam_core import files


@pytest.fixture()
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path behind every descriptor passed to os.fsync (then fsync it for real)."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    return calls
