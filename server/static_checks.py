"""The static ONNX checks before a receipt, run in a few worker processes.

An upload is acknowledged only after `free_common.models.onnx_static.check_static`
passed on the staged file. Run in the exchange process, each check would hold
the model several times over (bytes, parsed protobuf, weight arrays), for every
upload being checked: memory growing with model size times concurrency. Here a
bounded set of long-lived workers (`free_common.models.static_worker`) each
read the staged file themselves, so the exchange process holds only paths and
short JSON replies, and at most ``workers`` models are examined at once (other
uploads wait for a free worker, their bytes already on disk).

A worker that dies, runs past the time limit or answers garbage is replaced and
the upload is refused (the model did that, or at least could have); the next
upload gets a fresh worker.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from free_common.errors import (
    IntakeError,
    IntakeResourceError,
    IntakeTimeout,
    RecordError,
    ServerUnavailable,
)
from free_common.models.intake import IntakeResult
from free_common.models.metadata import task_to_dict
from free_common.models.onnx_static import IntakeLimits
from free_common.types import DpGuarantee, TaskMetadata

__all__ = ["StaticCheckPool", "StaticOutcome", "default_workers"]

log = logging.getLogger("free_server.static_checks")

_MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True)
class StaticOutcome:
    """What the static checks found in a model they passed.

    Attributes
    ----------
    warnings
        Things allowed but worth telling the owner.
    dp
        The DP guarantee the model declares in its metadata (not verified: declared).
    """

    warnings: tuple[str, ...] = ()
    dp: DpGuarantee | None = None


def _dp(reply: Any) -> DpGuarantee | None:
    """Read the worker's ``dp`` reply field (None when absent or not a valid guarantee)."""
    if not isinstance(reply, dict):
        return None
    try:
        return DpGuarantee(reply.get("epsilon"), reply.get("delta"))  # type: ignore[arg-type]
    except RecordError:
        return None


def default_workers() -> int:
    """Workers for this machine: half its cores, at least 2 and at most 8."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class _WorkerLost(Exception):
    """The worker died, timed out or broke the protocol; `error` is the upload's refusal."""

    def __init__(self, error: IntakeError) -> None:
        super().__init__(error.message)
        self.error = error


class _Worker:
    """One `static_worker` process and its pipes."""

    def __init__(self, limits: IntakeLimits) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "free_common.models.static_worker", json.dumps(asdict(limits))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def ask(
        self, request: dict[str, Any], timeout_s: float, limits: IntakeLimits
    ) -> dict[str, Any]:
        """Send one request and wait for its reply line."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None  # both are pipes (see __init__)
        try:
            stdin.write(json.dumps(request).encode() + b"\n")
            stdin.flush()
        except BrokenPipeError:
            raise self._lost(limits) from None
        line = self._read_line(stdout.fileno(), time.monotonic() + timeout_s)
        if line is None:
            self.kill()
            raise _WorkerLost(
                IntakeTimeout(
                    f"the static checks took longer than {timeout_s:g} s on this model; a"
                    " teacher's checks take well under a second: export a smaller model"
                )
            )
        if not line:
            raise self._lost(limits)
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            self.kill()
            raise _WorkerLost(IntakeError("the static checks gave no usable answer on this model"))
        return reply

    def _read_line(self, fd: int, deadline: float) -> bytes | None:
        """Read up to a newline; b"" when the worker closed its end, None past `deadline`."""
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(fd, 4096)
                if not chunk or len(data) + len(chunk) > _MAX_REPLY_BYTES:
                    return b""
                data += chunk
        return data

    def _lost(self, limits: IntakeLimits) -> _WorkerLost:
        self.kill()
        code = self.process.returncode
        if code is not None and code < 0:
            detail = f"the checker was killed by signal {-code}"
        else:
            detail = f"the checker exited with status {code}"
        return _WorkerLost(
            IntakeResourceError(
                f"the static checks could not finish on this model ({detail}; limit"
                f" {limits.memory_bytes:,} bytes of memory): export the model again with"
                " `free-client export`"
            )
        )

    def kill(self) -> None:
        """Stop the process now and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """Let the worker end by closing its stdin; kill it if it lingers."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


class StaticCheckPool:
    """At most ``workers`` static-check processes, shared by the exchange's call threads.

    Parameters
    ----------
    limits
        Caps of the checks and the workers' memory limit.
    workers
        Models checked at once (`default_workers`).
    timeout_s
        Wall-clock limit of one check; a worker past it is killed and replaced.
    """

    name = "static check workers"

    def __init__(
        self, limits: IntakeLimits, workers: int | None = None, *, timeout_s: float = 60.0
    ) -> None:
        self._limits = limits
        self._size = workers or default_workers()
        self._timeout_s = timeout_s
        self._idle: list[_Worker] = []
        self._live = 0  # idle, busy, or being started
        self._closed = True
        self._changed = threading.Condition()
        self._spawner: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Accept checks, and start every worker now (each is then kept).

        A worker takes most of a second of CPU to start: started at the first
        uploads, that would delay their receipts, under load most of all.
        """
        with self._changed:
            self._closed = False
            if self._spawner is None:
                # Workers die with the thread that started them (`free_common.lifetime`),
                # and a check may come from a thread that ends next: one thread that lives
                # as long as the pool starts them all.
                self._spawner = ThreadPoolExecutor(1, thread_name_prefix="static-check-spawner")
            missing = self._size - self._live
            self._live += missing
            spawner = self._spawner
        for _ in range(missing):
            spawner.submit(self._prestart)

    def _prestart(self) -> None:
        try:
            worker = _Worker(self._limits)
        except OSError as exc:
            log.warning("a static check worker did not start (%s): it is retried on use", exc)
            self._release(None)
            return
        self._release(worker)

    def stop(self, grace_s: float) -> None:
        """Refuse new checks, wait up to `grace_s` for running ones, then end every worker."""
        with self._changed:
            self._closed = True
            self._changed.wait_for(lambda: len(self._idle) == self._live, grace_s)
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.close()
        if self._live:
            log.info("%d static checks still running after %.1f s", self._live, grace_s)
        with self._changed:
            spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.shutdown(wait=False)

    def check(self, path: Path, task: TaskMetadata | None) -> StaticOutcome:
        """Run the static checks on the model file at `path`; return its warnings and DP.

        Raises
        ------
        IntakeError
            The subclass the checks refused the model with, or a refusal because the
            worker died or ran out of time on it.
        ServerUnavailable
            The server is shutting down (the client retries).
        """
        worker = self._acquire()
        request = {"path": str(path), "task": None if task is None else task_to_dict(task)}
        try:
            reply = worker.ask(request, self._timeout_s, self._limits)
        except _WorkerLost as lost:
            log.warning("static check worker replaced: %s", lost.error.message)
            self._release(None)
            raise lost.error from None
        except BaseException:
            worker.kill()
            self._release(None)
            raise
        self._release(worker)
        if reply["ok"]:
            warnings = tuple(str(w) for w in reply.get("warnings", ()))
            return StaticOutcome(warnings, _dp(reply.get("dp")))
        result = IntakeResult(
            accepted=False, reason=str(reply.get("reason")), refusal=str(reply.get("refusal"))
        )
        error = result.error()
        assert error is not None  # a refusal always has an error
        raise error

    def _acquire(self) -> _Worker:
        with self._changed:
            while True:
                if self._closed:
                    raise ServerUnavailable(
                        "the server is shutting down: submit again once it is back"
                    )
                while self._idle:
                    worker = self._idle.pop()
                    if worker.process.poll() is None:
                        return worker
                    # Died while idle (killed from outside): not this upload's fault.
                    self._live -= 1
                if self._live < self._size:
                    self._live += 1
                    break
                self._changed.wait()
        try:
            if self._spawner is None:
                raise RuntimeError("stopped")
            return self._spawner.submit(_Worker, self._limits).result()
        except RuntimeError:  # the pool stopped between the check above and the spawn
            self._release(None)
            raise ServerUnavailable(
                "the server is shutting down: submit again once it is back"
            ) from None
        except OSError:
            self._release(None)
            raise

    def _release(self, worker: _Worker | None) -> None:
        """Return a healthy worker to the pool, or account for a lost one (None)."""
        retired = None
        with self._changed:
            if worker is None or self._closed:
                self._live -= 1
                retired = worker
            else:
                self._idle.append(worker)
            self._changed.notify_all()
        if retired is not None:
            retired.close()
