"""Full intake of received submissions, a bounded number at a time.

Each of ``workers`` threads takes a received submission and runs
`free_common.models.intake.run_intake_file` on its blob, which streams the file
to a separate process that examines it under memory and time limits (the model
is never held whole in the server), screens what that accepts (when the server
screens: `free_server.screener`), and records the verdict with its reason, or
holds the submission for the operator.
A worker process that crashes or is killed is a refusal with a reason (intake
reports it as one), never a dead server.

Nothing acknowledged is lost: the pool works from the store, not from memory.
On start it cleans what a crash left (`Store.recover`) and queues every
submission still "received"; a rescan every few seconds picks up anything a
failed attempt left behind. A failure of the pool itself (an unreadable blob, a
worker that cannot start) is retried a few times before the submission is
refused with a reason that points at the aggregator.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from free_common.models.intake import IntakeResult, run_intake_file
from free_common.models.metadata import task_from_dict
from free_common.models.onnx_static import IntakeLimits
from free_common.types import TaskMetadata
from free_server.exchange import one_line_reason
from free_server.store import Store

if TYPE_CHECKING:
    from free_common.screening.screen import ScreeningReport

__all__ = ["INTAKE_NICENESS", "MAX_ATTEMPTS", "IntakePool", "Judge", "Screen", "default_judge"]

log = logging.getLogger("free_server.intake")

MAX_ATTEMPTS = 3
"""Tries of one submission before a failure of the pool itself becomes a refusal."""

Judge = Callable[[Path, TaskMetadata, IntakeLimits], IntakeResult]
"""Gives the verdict on a stored model file; model faults are results, never exceptions."""

Screen = Callable[[Path, TaskMetadata, str], "ScreeningReport"]
"""Screens a model intake accepted (`free_server.screener.Screener`); the str names it."""


INTAKE_NICENESS = 10
"""How far below the exchange's CPU priority intake workers run.

Receipts are what owners wait on; verdicts come after. On a machine whose cores
the workers would fill, the exchange then still gets the CPU it needs, and the
workers get every cycle it leaves (they are never idle while models wait).
"""


def default_judge(path: Path, task: TaskMetadata, limits: IntakeLimits) -> IntakeResult:
    """Run full intake in its bounded worker process, at a lower CPU priority."""
    return run_intake_file(path, task=task, limits=limits, niceness=INTAKE_NICENESS)


class IntakePool:
    """Worker threads that give received submissions their verdict.

    Parameters
    ----------
    store
        The server's store (shared with the exchange service; it is thread-safe).
    limits
        Caps and the worker process's memory and time limits.
    workers
        How many models are examined at once.
    rescan_s
        How often the store is scanned for submissions nobody queued.
    judge
        The verdict function (`default_judge`).
    screen
        Screening of what intake accepts (None: accept without screening).
    """

    name = "intake workers"

    def __init__(
        self,
        store: Store,
        limits: IntakeLimits,
        workers: int,
        *,
        rescan_s: float = 5.0,
        judge: Judge = default_judge,
        screen: Screen | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("an intake pool needs at least one worker")
        self._store = store
        self._limits = limits
        self._workers = workers
        self._rescan_s = rescan_s
        self._judge = judge
        self._screen = screen
        self._queue: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        self._known: set[int] = set()  # queued or being judged
        self._failures: dict[int, int] = {}
        self._stopping = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Clean up after a crash, queue every unjudged submission, start the workers."""
        report = self._store.recover()
        if report.temp_files or report.orphan_blobs:
            log.info(
                "recovered the store: removed %d temporary files and %d unreferenced blobs",
                report.temp_files,
                len(report.orphan_blobs),
            )
        queued = self.rescan()
        if queued:
            log.info("queued %d received submissions for intake", queued)
        for index in range(self._workers):
            self._spawn(self._work, f"intake-{index}")
        self._spawn(self._rescan_loop, "intake-rescan")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        # Daemon threads: a worker waiting on a model must not hold the process at exit;
        # its submission stays "received" and is judged after the next start.
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def enqueue(self, submission_id: int) -> None:
        """Queue a submission for intake (a no-op when it is queued or being judged)."""
        with self._lock:
            if submission_id in self._known or self._stopping.is_set():
                return
            self._known.add(submission_id)
        self._queue.put(submission_id)

    def rescan(self) -> int:
        """Queue every submission the store still holds as received; return how many."""
        rows = self._store.pending_intake()
        for row in rows:
            self.enqueue(row.id)
        return len(rows)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or being judged; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._known, timeout_s)

    def stop(self, grace_s: float) -> None:
        """Stop taking work; wait up to `grace_s` for models being judged."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(grace_s)
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:
            log.info("left %s running: their submissions are judged after restart", busy)

    def _rescan_loop(self) -> None:
        while not self._stopping.wait(self._rescan_s):
            try:
                self.rescan()
            except Exception:
                log.exception("scanning the store for received submissions failed")

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                submission_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._judge_one(submission_id)
            except Exception:
                if self._stopping.is_set():
                    # The store closed under a judgement that outlived the grace period.
                    log.info("submission %d is judged after the next start", submission_id)
                else:
                    # The store itself failed: the row stays "received" and the rescan retries.
                    log.exception("recording the verdict of submission %d failed", submission_id)
            finally:
                with self._idle:
                    self._known.discard(submission_id)
                    self._idle.notify_all()

    def _judge_one(self, submission_id: int) -> None:
        row = self._store.submission(submission_id)
        if row.state != "received" or row.held_at is not None:
            return
        report: ScreeningReport | None = None
        try:
            path = self._store.blob_path(row.sha256)
            task = task_from_dict(row.task_metadata)
            result = self._judge(path, task, self._limits)
            if result.accepted and self._screen is not None:
                report = self._screen(path, task, f"submission-{submission_id}")
        except Exception:
            log.exception("intake of submission %d could not run", submission_id)
            self._failed(submission_id)
            return
        self._failures.pop(submission_id, None)
        figures = None if report is None else report.to_dict()
        if report is not None and report.verdict == "held":
            self._store.hold(submission_id, report.reason or "held by screening", figures)
            log.info("submission %d held for the operator: %s", submission_id, report.reason)
            return
        if not result.accepted:
            reason: str | None = one_line_reason(result.reason)
            verdict = f"refused ({result.refusal}): {reason}"
        elif report is not None and report.verdict == "refused":
            reason = report.reason
            verdict = f"refused by screening: {reason}"
        else:
            reason, verdict = None, "accepted"
        self._store.set_verdict(
            submission_id, accepted=reason is None, reason=reason, screening=figures
        )
        log.info("submission %d %s", submission_id, verdict)

    def _failed(self, submission_id: int) -> None:
        attempts = self._failures.get(submission_id, 0) + 1
        self._failures[submission_id] = attempts
        if attempts < MAX_ATTEMPTS:
            return  # still "received": the next rescan queues it again
        self._failures.pop(submission_id, None)
        self._store.set_verdict(
            submission_id,
            accepted=False,
            reason=(
                f"the server could not run intake on this model ({attempts} attempts failed);"
                " ask the aggregator to check the server log"
            ),
        )
