"""Re-running a `free-bench` command on several processes with torch's own launcher.

``free-bench run --workers N`` starts ``python -m torch.distributed.run --standalone
--nproc-per-node N -m free_common.bench.cli run ...`` (the same arguments): N ranks on
this machine, a rendezvous on a free loopback port, and the launcher's own failure
handling (one rank dies, the others are stopped and the launch fails). A multi-host
deployment uses the same launcher with ``--nnodes`` and a ``--rdzv-endpoint`` instead of
``--standalone``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["launcher_command", "relaunch", "under_launcher"]


def under_launcher() -> bool:
    """Tell whether this process is a rank that torch's launcher started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launcher_command(workers: int, program: Sequence[str]) -> list[str]:
    """Return the command that runs `program` on `workers` local ranks under torch's launcher.

    `program` is a script or ``-m`` and a module, then its arguments.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={workers}",
        *program,
    ]


def relaunch(workers: int, args: Sequence[str]) -> int:
    """Run ``free-bench ARGS`` on `workers` local processes; returns the launcher's exit code."""
    command = launcher_command(workers, ["-m", "free_common.bench.cli", *args])
    return subprocess.run(command, check=False).returncode
