"""Tie a child process's life to its parent's (Linux ``PR_SET_PDEATHSIG``).

Workers that examine untrusted models, and the Flower SuperLink, serve one server
process. If that process is killed outright (SIGKILL, the OOM killer) nothing would
stop them: a worker would go on using memory for nobody, a SuperLink would keep its
port. The kernel can send them a signal instead when their parent goes; a child
calls `die_with_parent` first thing (it survives an exec).

The signal comes when the *thread* that started the child ends, so children must be
started from threads that live as long as the work they hand out (the server's
main thread, its pool threads).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send `signum` to this process when its parent dies.

    Parameters
    ----------
    parent
        The parent's pid, when known: if this process already has another parent
        (the parent died before this call), it exits at once.
    signum
        The signal to receive.
    """
    if not sys.platform.startswith("linux"):
        return  # no such kernel feature; the workers' own CPU and time limits remain
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os._exit(1)  # orphaned before the call above: nobody to serve
