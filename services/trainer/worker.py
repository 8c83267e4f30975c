"""The contract between the trainer and a job's worker process (``samforge train``).

Every executor runs the same worker command; this module is both sides of what they exchange:

- ``--events FILE``: one JSON object per :class:`~sam_core.training.config.ProgressEvent`, appended and flushed
  as it happens (:class:`EventsFile` writes, :func:`read_events` tails from a byte offset; a partial last line
  is left for the next read).
- ``<out>/result.json``, written atomically by rank 0 as its last act (:func:`write_result`): ``status`` (one
  of :class:`WorkerStatus`), ``exit_code``, ``error`` when there is one, and for a finished run
  ``FinetuneResult.summary()``. The trainer trusts it over the exit status: a worker it re-attached to after
  a restart is not its child, so its exit status is unknown; no result.json means the worker died (killed).
- exit status (:data:`EXIT_CODES`): 0 published, 2 bad input, 3 rejected by the publishing guard, 4 stopped by
  SIGTERM (checkpointed at the next progress event, resumable); anything else is a crash.
- SIGTERM (:class:`StopOnSigterm`): the worker stops at its next progress event; train() checkpoints first.
  Under torchrun only rank 0 gets progress events; the other ranks fail their next collective once rank 0
  has gone, which torchrun reports as a failure; result.json (rank 0) still says ``stopped``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from sam_core.files import atomic_write_text
from sam_core.training.config import Phase, ProgressEvent, StopTraining

RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"
WORKER_LOG = "worker.log"


class WorkerStatus(str, enum.Enum):
    PUBLISHED = "published"
    INVALID_INPUT = "invalid_input"
    REJECTED = "rejected"  # the publishing guard refused the candidate (exit 3; summary["guard"]: its verdict)
    STOPPED = "stopped"
    FAILED = "failed"


EXIT_CODES: dict[WorkerStatus, int] = {
    WorkerStatus.PUBLISHED: 0, WorkerStatus.INVALID_INPUT: 2, WorkerStatus.REJECTED: 3, WorkerStatus.STOPPED: 4,
    WorkerStatus.FAILED: 1,
}


class StoppedBySignal(StopTraining):
    """SIGTERM arrived: the run stops at its next progress event (train() checkpoints before re-raising)."""


def event_json(event: ProgressEvent) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    data["state"] = event.state.value
    return data


def event_from_json(data: dict[str, Any]) -> ProgressEvent:
    known = {f.name for f in dataclasses.fields(ProgressEvent)}
    values = {k: v for k, v in data.items() if k in known}
    values["state"] = Phase(values["state"])
    return ProgressEvent(**values)


class EventsFile:
    """A progress callback appending one JSON line per event to ``path`` (opened on the first event)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stream: TextIO | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if self._stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._stream.write(json.dumps(event_json(event), allow_nan=False, default=str) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def read_events(path: Path, offset: int) -> tuple[list[ProgressEvent], int]:
    """The complete lines of ``path`` after byte ``offset`` as events, and the offset after the last of them."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [event_from_json(json.loads(line)) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


class StopOnSigterm:
    """While installed, SIGTERM sets a flag; the wrapped callback raises :class:`StoppedBySignal` at the next event."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def wrap(self, callback: Callable[[ProgressEvent], None]) -> Callable[[ProgressEvent], None]:
        def checked(event: ProgressEvent) -> None:
            callback(event)
            if self.requested:
                raise StoppedBySignal()
        return checked


def write_result(out: str | os.PathLike[str], status: WorkerStatus, *, summary: dict[str, Any] | None = None,
                 error: str = "", field: str | None = None) -> int:
    """Atomically write ``<out>/result.json``; returns the exit status that goes with ``status``."""
    code = EXIT_CODES[status]
    data: dict[str, Any] = {"status": status.value, "exit_code": code, **(summary or {})}
    if error:
        data.update(error=error, field=field)
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / RESULT_FILE, json.dumps(data, indent=1, allow_nan=False, default=str) + "\n")
    return code


def read_result(out: Path) -> dict[str, Any] | None:
    """``<out>/result.json`` (None when absent or unreadable: the worker did not finish writing it)."""
    try:
        data = json.loads((out / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("status") in {s.value for s in WorkerStatus} else None


def is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0 (the rank that reports, evaluates and publishes)."""
    return os.environ.get("RANK", "0") == "0"
