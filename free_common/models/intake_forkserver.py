"""A pre-imported process that forks one fresh full-intake worker per model.

Starting ``python -m free_common.models.intake_worker`` for every model costs
about two CPU-seconds of interpreter start and imports (torch, onnx) before a
small model is examined in a fraction of one. The fork server pays the imports
once: it is started with the first intake, imports what the worker needs, and
for each model forks a child that becomes exactly that worker, with the same
isolation as a fresh process: its own address space under the worker's limits,
stdin, stdout and stderr on pipes of the caller's, an empty working directory,
its own CPU priority, every other descriptor closed. One model per process, as
before: a child never sees a second model, and nothing a model did survives it.

The fork server itself never runs a model and stays single-threaded, so forking
it is safe: onnxruntime, which starts a thread when imported, is imported by
each child after the fork (tens of milliseconds), not by the server.

Protocol (``AF_UNIX`` ``SOCK_SEQPACKET``, one message each): the caller sends
``{"cwd": ..., "niceness": ...}`` with four descriptors, the child's stdin,
stdout and stderr ends and one end of a status socket pair; the server answers
on the status socket ``exit <code>`` (`subprocess` convention: ``-N`` for a
signal) when the child has ended. ``kill`` from the caller, or the caller
closing its end, kills the child. The server exits when its control socket
closes, or with the process that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import IO

__all__ = ["ForkedWorker", "fork_worker"]

_MAX_MESSAGE = 4096
_PRELOAD = ("numpy", "onnx", "torch", "free_common.models.convert")
"""What the server imports once; nothing here may start a thread (see the module docstring)."""


class ForkServerLost(OSError):
    """The fork server died or could not be reached: an aggregator fault, not the model's."""


@dataclass
class ForkedWorker:
    """A forked intake worker: pipes to its standard streams, and its exit status."""

    stdin: IO[bytes]
    stdout: int
    stderr: int
    status: socket.socket

    def communicate(self, timeout_s: float) -> tuple[bytes, bytes, int]:
        """Read stdout and stderr to their end and wait for the exit code.

        Call after writing all input and closing `stdin`. Raises
        `subprocess.TimeoutExpired` when the worker outlives `timeout_s` (it
        keeps running: `kill` it) and `ForkServerLost` when the exit status
        cannot come (the fork server died).
        """
        deadline = time.monotonic() + timeout_s
        out: dict[int, list[bytes]] = {self.stdout: [], self.stderr: []}
        returncode: int | None = None
        with selectors.DefaultSelector() as selector:
            for fd in out:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(self.status, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                events = selector.select(left) if left > 0 else []
                if not events:
                    raise subprocess.TimeoutExpired("intake worker", timeout_s)
                for key, _ in events:
                    if key.fileobj is self.status:
                        returncode = _exit_code(self.status.recv(_MAX_MESSAGE))
                        selector.unregister(self.status)
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        out[key.fd].append(chunk)
                    else:
                        selector.unregister(key.fd)
        assert returncode is not None
        return b"".join(out[self.stdout]), b"".join(out[self.stderr]), returncode

    def kill(self) -> None:
        """Have the fork server kill the worker (a no-op once it has ended)."""
        with contextlib.suppress(OSError):
            self.status.send(b"kill")

    def close(self) -> None:
        """Close this side's descriptors (the worker, if still running, is killed)."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        for fd in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.status.close()


def _exit_code(message: bytes) -> int:
    word, _, code = message.decode(errors="replace").partition(" ")
    if word != "exit":
        raise ForkServerLost("the intake fork server ended before the worker's exit status")
    return int(code)


class _Client:
    """The caller's side: starts the fork server on first use and again if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def fork(self, cwd: str, niceness: int, env: dict[str, str]) -> ForkedWorker:
        """Fork a worker in `cwd` at `niceness` below the fork server's priority."""
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        status, status_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = json.dumps({"cwd": cwd, "niceness": niceness}).encode()
        theirs = [stdin_r, stdout_w, stderr_w, status_child.fileno()]
        try:
            self._send(request, theirs, env)
        except BaseException:
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            status.close()
            raise
        finally:
            for fd in theirs[:3]:
                os.close(fd)
            status_child.close()
        return ForkedWorker(os.fdopen(stdin_w, "wb"), stdout_r, stderr_r, status)

    def _send(self, request: bytes, fds: list[int], env: dict[str, str]) -> None:
        with self._lock:
            for attempt in range(2):
                if (
                    self._control is None
                    or self._process is None
                    or self._process.poll() is not None
                ):
                    self._start(env)
                assert self._control is not None
                try:
                    socket.send_fds(self._control, [request], fds)
                    return
                except OSError as exc:
                    self._stop()
                    if attempt:
                        raise ForkServerLost(
                            f"the intake fork server is unreachable: {exc}"
                        ) from exc

    def _start(self, env: dict[str, str]) -> None:
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=env,
            )
        self._control = ours

    def _stop(self) -> None:
        if self._control is not None:
            self._control.close()  # the server exits when its control socket closes
            self._control = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            self._process = None

    def close(self) -> None:
        """Stop the fork server (workers still running are killed with it)."""
        with self._lock:
            self._stop()


_CLIENT = _Client()


def fork_worker(cwd: str, niceness: int, env: dict[str, str]) -> ForkedWorker:
    """Start a full-intake worker for one model, forked from the pre-imported server.

    `env` is the fork server's environment, used when it has to be started.
    Raises `ForkServerLost` when no fork server can be reached.
    """
    return _CLIENT.fork(cwd, niceness, env)


# The fork server process -----------------------------------------------------------


@dataclass
class _Job:
    pid: int
    pidfd: int
    status: socket.socket
    killed: bool = False
    reaped: bool = False
    caller_gone: bool = False


def _become_worker(request: dict[str, object], fds: list[int]) -> None:
    """In the forked child: take the descriptors as stdio and run the worker; never return."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(str(request["cwd"]))
        niceness = int(str(request["niceness"]))
        if niceness:
            os.nice(niceness)
        from free_common.models import intake_worker

        intake_worker.main()  # exits the process itself
        code = 0
    except BaseException:  # noqa: BLE001 (an exit too: the child must not unwind into the server)
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def _serve(control: socket.socket) -> None:
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is control:
                message, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, 4)
                if not message:
                    return  # the caller is gone
                job = _fork(json.loads(message), fds)
                selector.register(job.pidfd, selectors.EVENT_READ, job)
                selector.register(job.status, selectors.EVENT_READ, job)
                continue
            job = key.data
            if key.fileobj is job.status:
                _on_caller_message(selector, job)
            else:
                _reap(selector, job)


def _on_caller_message(selector: selectors.BaseSelector, job: _Job) -> None:
    # Every message is read: closing a Unix socket with unread data resets the
    # peer, and the caller would get ECONNRESET instead of the queued exit status.
    try:
        message = job.status.recv(_MAX_MESSAGE)
    except OSError:
        message = b""
    if not job.reaped and not job.killed:  # "kill", or the caller closed its end
        os.kill(job.pid, signal.SIGKILL)  # not reaped yet: the pid is still ours
        job.killed = True
    if not message:
        job.caller_gone = True
        selector.unregister(job.status)
        if job.reaped:
            job.status.close()


def _reap(selector: selectors.BaseSelector, job: _Job) -> None:
    _, wait_status = os.waitpid(job.pid, 0)
    job.reaped = True
    selector.unregister(job.pidfd)
    os.close(job.pidfd)
    with contextlib.suppress(OSError):
        job.status.send(f"exit {os.waitstatus_to_exitcode(wait_status)}".encode())
    if job.caller_gone:
        job.status.close()
    # Otherwise the status socket stays open until the caller closes it.


def _fork(request: dict[str, object], fds: list[int]) -> _Job:
    pid = os.fork()
    if pid == 0:
        _become_worker(request, fds)
    for fd in fds[:3]:
        os.close(fd)
    return _Job(pid, os.pidfd_open(pid), socket.socket(fileno=fds[3]))


def main() -> None:
    """Run the fork server on the control socket whose descriptor is ``argv[1]``.

    No parent-death signal here: it would follow the caller's thread that started
    the server, not the caller. The control socket closes when the caller's
    process ends, however it ends, and the server then exits; its workers follow
    it (each has its own parent-death signal).
    """
    for name in _PRELOAD:
        __import__(name)
    _serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
