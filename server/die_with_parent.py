"""Exec a command that the kernel stops when the server dies.

``python -m free_server.die_with_parent SERVER_PID COMMAND [ARG ...]``

The SuperLink runs in a session of its own, so that one signal reaches the
SuperExec and ServerApp it starts. That also means nothing ends it when the server
is killed outright (SIGKILL, the OOM killer): it would go on holding the Flower
port, and the next `free-server start` could not bind it. Here Linux's
``PR_SET_PDEATHSIG`` is set before the exec (an exec keeps it), so the kernel sends
SIGTERM when the server thread that started the command ends; the SuperLink's own
children follow through Flower's parent-pid monitors.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1


def main() -> None:
    """Set the parent-death signal, check the parent still lives, exec the command."""
    parent, command = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        sys.exit(1)  # the server died before the prctl above: nobody to serve
    os.execvp(command[0], command)  # noqa: S606 (argv from free_server.superlink, no shell)


if __name__ == "__main__":
    main()
