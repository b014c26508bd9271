"""Tie a measuring child's life to its agent: a killed agent leaves no orphan measuring."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "EDGEFARM_AGENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """On Linux, ask the kernel to SIGKILL us when the agent dies (PR_SET_PDEATHSIG);
    exit at once if the agent is already gone. Elsewhere a no-op."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not sys.platform.startswith("linux") or not expected:
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if str(os.getppid()) != expected:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
