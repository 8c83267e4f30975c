"""`samforge up`'s process plumbing in this process: stop signals become StopRequested once, the
parent-death signal is set in a real child, and ``Stack.stop`` SIGKILLs what ignores SIGTERM within its bound.
(The whole `up` process under SIGTERM / SIGHUP / SIGKILL: tests/integration/test_stack_signals.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.stack import STOP_SIGNALS, Stack, StopRequested, StopSignals, die_with_parent


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_first_stop_signal_raises_later_ones_are_ignored(signum):
    before = signal.getsignal(signum)
    with StopSignals() as signals:
        with pytest.raises(StopRequested) as raised:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs at once and interrupts this
        assert raised.value.signum == signum
        signals.stopping()
        os.kill(os.getpid(), signum)  # ignored: a second Ctrl-C must not cut the stop short
    assert signal.getsignal(signum) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_get_the_parent_death_signal():
    preexec = die_with_parent()
    assert preexec is not None
    # /proc/self/status has no field for it; the child asks prctl(PR_GET_PDEATHSIG) itself
    probe = ("import ctypes, signal; v = ctypes.c_int(); "
             "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(signal.Signals(v.value).name)")
    out = subprocess.run([sys.executable, "-c", probe], preexec_fn=preexec, capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout.strip() == "SIGTERM"
    plain = subprocess.run([sys.executable, "-c", probe.replace("signal.Signals(v.value).name", "v.value")],
                           capture_output=True, text=True, check=True, timeout=30)
    assert plain.stdout.strip() == "0"  # without it: nothing (the test can tell the difference)


def test_stop_kills_what_ignores_sigterm_within_the_bound(tmp_path: Path):
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    stack = Stack({"stubborn": proc}, {}, {}, tmp_path)
    started = time.monotonic()
    codes = stack.stop(timeout=0.5)
    assert codes == {"stubborn": -signal.SIGKILL}
    assert time.monotonic() - started < 10
