"""The demo's processes: the public commands run as subprocesses, each with a log.

`Processes` runs a command to completion (`Processes.run`, its output kept in
``LOGS/<name>.log`` and its stdout returned) or starts one in the background in
a process group of its own (`Processes.start`), and stops every background one
(SIGTERM to the group, then SIGKILL after a grace period) when the demo ends,
fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from free_common.errors import DemoError

__all__ = ["Background", "Processes", "command_path", "free_ports"]


def command_path(name: str) -> str:
    """Return the path of an installed console script, next to this Python first."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"the {name} command is not installed: run `make install` first")
    return found


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports free on 127.0.0.1 now."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@dataclass
class Background:
    """A command running in the background, its output going to `log`."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]
    header: int
    """Bytes of the log before the command's output (the command line)."""

    def text(self) -> str:
        """Return what it has written so far."""
        return self.log.read_bytes()[self.header :].decode("utf-8", errors="replace")

    def wait_for(self, needle: str, timeout_s: float) -> None:
        """Wait until its output holds `needle`.

        Raises
        ------
        DemoError
            It exited first, or `timeout_s` passed.
        """
        deadline = time.monotonic() + timeout_s
        while needle not in self.text():
            code = self.process.poll()
            if code is not None:
                raise DemoError(
                    f"{self.name} exited ({code}): {_last_line(self.text())}; log: {self.log}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{self.name} did not say {needle!r} within {timeout_s:.0f} s; log: {self.log}"
                )
            time.sleep(0.25)


class Processes:
    """Runs the demo's commands; remembers background ones to stop them all at the end.

    Parameters
    ----------
    logs
        Folder for one ``<name>.log`` per command.
    env
        Extra environment variables for every command.
    """

    def __init__(self, logs: Path, env: Mapping[str, str]) -> None:
        self.logs = logs
        self.env = {**os.environ, **env}
        self.background: list[Background] = []
        logs.mkdir(parents=True, exist_ok=True)

    def run(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end; its stdout and stderr go to ``LOGS/<name>.log``.

        Raises
        ------
        DemoError
            With `check`, it exited nonzero (the message quotes its last line).
        """
        log = self.logs / f"{name}.log"
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            check=False,
        )
        log.write_text(
            f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}exit {result.returncode}\n",
            encoding="utf-8",
        )
        if check and result.returncode != 0:
            raise DemoError(
                f"{name} failed (exit {result.returncode}):"
                f" {_last_line(result.stderr or result.stdout)}; log: {log}"
            )
        return result

    def start(
        self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None
    ) -> Background:
        """Start a command in the background, in a process group of its own."""
        log = self.logs / f"{name}.log"
        handle = log.open("wb")
        header = f"$ {' '.join(argv)}\n".encode()
        handle.write(header)
        handle.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )
        started = Background(name, process, log, handle, len(header))
        self.background.append(started)
        return started

    def stop(self, started: Background, grace_s: float = 60.0) -> int:
        """Stop one background command (SIGTERM to its group, SIGKILL after `grace_s`)."""
        process = started.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        started.handle.close()
        with contextlib.suppress(ValueError):
            self.background.remove(started)
        return process.returncode

    def stop_all(self, on_stop: Callable[[str, int], None] | None = None) -> None:
        """Stop every background command, the newest first."""
        for started in reversed(list(self.background)):
            code = self.stop(started)
            if on_stop is not None:
                on_stop(started.name, code)
