"""`samforge up` never leaves its services behind: SIGTERM / SIGHUP (and SIGINT) stop the three children
(forwarded SIGTERM, bounded wait, then SIGKILL) and free their ports; if `up` itself is killed with SIGKILL,
the children exit on their own (PR_SET_PDEATHSIG).

`up` runs as a real process (python -m services.cli up) on the tiny model; its children are found through
/proc (their parent pid), not through anything `up` prints, so the test sees exactly what an operator would.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0
# the children drain idle servers at once; the stack's own bound (forward SIGTERM, wait, SIGKILL) is below it
EXIT_TIMEOUT = 45.0


@dataclass
class Up:
    proc: subprocess.Popen[str]
    endpoints: dict
    children: list[int]

    def ports(self) -> list[int]:
        grpc_ports = [int(address.rsplit(":", 1)[1]) for address in self.endpoints["endpoints"].values()]
        metrics_ports = [int(url.rsplit(":", 1)[1].split("/", 1)[0]) for url in self.endpoints["metrics"].values()]
        return grpc_ports + metrics_ports


def _lines(stream) -> queue.Queue[str | None]:
    """stdout lines on a queue (None at EOF), so the test can wait with a deadline instead of blocking."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_endpoints(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> dict:
    """The JSON `up` prints once every service is SERVING (several lines, indented)."""
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            raise AssertionError(f"`samforge up` exited with {proc.wait()} before printing its endpoints")
        text += line
        if line.startswith("}"):
            return json.loads(text)
    raise AssertionError(f"no endpoints after {START_TIMEOUT:.0f} s; output so far:\n{text}")


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _stat(int(entry.name))
            if state and state[1] == pid and state[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in parentheses may contain spaces
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    state = _stat(pid)
    return state is not None and state[0] != "Z"


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (SO_REUSEADDR: TIME_WAIT leftovers do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)  # poll interval
    return condition()


@contextmanager
def samforge_up(tmp_path: Path) -> Iterator[Up]:
    """`samforge up` on the tiny model with free ports; whatever survives the test is killed afterwards."""
    env = {**os.environ, "SAMFORGE_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", "tiny", "--base-port", "0",
                             "--var", str(tmp_path / "var")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    children: list[int] = []
    try:
        endpoints = _read_endpoints(proc, _lines(proc.stdout))
        children = children_of(proc.pid)
        assert len(children) == 3, f"`samforge up` should have 3 children, /proc shows {children}"
        up = Up(proc, endpoints, children)
        assert all(port_in_use(port) for port in up.ports()), up.endpoints
        yield up
    finally:
        for pid in [proc.pid, *children]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


# SIGINT takes the same path (tests/services/test_stop_signals.py); each case here starts a whole stack
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_stops_every_service_and_frees_its_ports(tmp_path, signum):
    with samforge_up(tmp_path) as up:
        up.proc.send_signal(signum)
        code = up.proc.wait(EXIT_TIMEOUT)
        assert wait_until(lambda: not any(alive(pid) for pid in up.children), EXIT_TIMEOUT), \
            f"children still running after `up` got {signum.name}: {[p for p in up.children if alive(p)]}"
        assert wait_until(lambda: not any(port_in_use(port) for port in up.ports()), EXIT_TIMEOUT), \
            [port for port in up.ports() if port_in_use(port)]
        assert code == 0, f"`samforge up` exited with {code} on {signum.name}"


def test_children_exit_when_up_is_killed(tmp_path):
    with samforge_up(tmp_path) as up:
        up.proc.kill()
        up.proc.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in up.children), EXIT_TIMEOUT), \
            f"children outlived a SIGKILLed `up`: {[p for p in up.children if alive(p)]}"
        assert wait_until(lambda: not any(port_in_use(port) for port in up.ports()), EXIT_TIMEOUT)
