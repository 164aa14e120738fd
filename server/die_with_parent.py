"""Exec a command that the kernel stops when the server dies.

``python -m free_server.die_with_parent SERVER_PID COMMAND [ARG ...]``

The SuperLink runs in a session of its own, so that one signal reaches the
SuperExec and ServerApp it starts. That also means nothing ends it when the server
is killed outright (SIGKILL, the OOM killer): it would go on holding the Flower
port, and the next `free-server start` could not bind it. Here the parent-death
signal is set to SIGTERM before the exec (`free_common.lifetime`; an exec keeps
it); the SuperLink's own children follow through Flower's parent-pid monitors.
"""

from __future__ import annotations

import os
import signal
import sys

from free_common.lifetime import die_with_parent

__all__ = ["main"]


def main() -> None:
    """Set the parent-death signal, then exec the command."""
    parent, command = int(sys.argv[1]), sys.argv[2:]
    die_with_parent(parent, signal.SIGTERM)
    os.execvp(command[0], command)  # noqa: S606 (argv from free_server.superlink, no shell)


if __name__ == "__main__":
    main()
