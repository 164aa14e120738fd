"""The static checks before a receipt run in a bounded pool of worker processes.

Real worker processes on tiny models: the workers start with the pool (not with
the first uploads), refusals keep their own class, a worker that dies or runs
out of time costs only the upload it was checking, at most ``workers``
processes run at once, and a stopped pool refuses politely.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from exchange_harness import child_pids, process_stat, wait_until
from onnx_builders import TINY_TASK, copy, point_to_external, tiny_model

from free_common.errors import (
    ExternalDataError,
    IntakeResourceError,
    IntakeTimeout,
    NotOnnxError,
    ServerUnavailable,
)
from free_common.models.onnx_static import IntakeLimits
from free_server.static_checks import StaticCheckPool


def _worker_pids() -> list[int]:
    return child_pids("free_common.models.static_worker")


@pytest.fixture
def pool() -> Iterator[StaticCheckPool]:
    checks = StaticCheckPool(IntakeLimits(), workers=2)
    checks.start()
    yield checks
    checks.stop(5)


@pytest.fixture
def single() -> Iterator[StaticCheckPool]:
    """A pool of one worker, so the test knows which process checks."""
    checks = StaticCheckPool(IntakeLimits(), workers=1)
    checks.start()
    yield checks
    checks.stop(5)


def test_the_workers_start_with_the_pool_before_any_upload(pool: StaticCheckPool) -> None:
    # Starting one costs most of a second of CPU: the first receipts must not pay it.
    assert wait_until(lambda: len(_worker_pids()) == 2, 20)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def test_a_good_model_passes_and_a_refusal_keeps_its_class(
    pool: StaticCheckPool, tmp_path: Path
) -> None:
    good = _write(tmp_path, "good.onnx", tiny_model().SerializeToString())
    assert pool.check(good, TINY_TASK).warnings == ()
    external = copy(tiny_model())
    point_to_external(external.graph.initializer[0], "secret.bin")
    hostile = _write(tmp_path, "hostile.onnx", external.SerializeToString())
    with pytest.raises(ExternalDataError):
        pool.check(hostile, TINY_TASK)
    with pytest.raises(NotOnnxError):
        pool.check(_write(tmp_path, "junk.onnx", b"\xff" * 100), None)
    # A refusal is an answer, not a failure: the same process checks the next model.
    before = _worker_pids()
    assert pool.check(good, None).warnings == ()
    assert _worker_pids() == before and len(before) == 2


def test_a_worker_killed_while_idle_is_replaced_without_refusing_anyone(
    single: StaticCheckPool, tmp_path: Path
) -> None:
    good = _write(tmp_path, "good.onnx", tiny_model().SerializeToString())
    single.check(good, TINY_TASK)
    (victim,) = _worker_pids()
    os.kill(victim, signal.SIGKILL)
    # Dead (a zombie the pool has not reaped yet) before the next upload comes.
    assert wait_until(lambda: _state(victim) == "Z", 10)
    assert single.check(good, TINY_TASK).warnings == ()
    assert victim not in _worker_pids()


def test_a_worker_that_dies_on_a_model_refuses_only_that_upload(
    single: StaticCheckPool, tmp_path: Path
) -> None:
    # A FIFO holds the worker inside the check until the test kills it, as if a
    # hostile model had crashed the parser: that upload is refused, the next is served.
    fifo = tmp_path / "stuck.onnx"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def check() -> None:
        try:
            single.check(fifo, TINY_TASK)
        except BaseException as exc:  # noqa: BLE001 (inspected below)
            outcome.append(exc)

    thread = threading.Thread(target=check)
    thread.start()
    writer: list[int] = []

    def worker_reads_the_fifo() -> bool:
        # Opening the write end without blocking succeeds once a reader has it open:
        # the worker is inside the check (it was started before, with the pool).
        with contextlib.suppress(OSError):
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return bool(writer)

    assert wait_until(worker_reads_the_fifo, 20)
    os.kill(_worker_pids()[0], signal.SIGKILL)
    thread.join(20)
    os.close(writer[0])
    assert len(outcome) == 1 and isinstance(outcome[0], IntakeResourceError)
    assert "killed by signal 9" in str(outcome[0])
    good = _write(tmp_path, "good.onnx", tiny_model().SerializeToString())
    assert single.check(good, TINY_TASK).warnings == ()


def test_a_check_past_the_time_limit_is_refused_and_its_worker_replaced(tmp_path: Path) -> None:
    checks = StaticCheckPool(IntakeLimits(), workers=1, timeout_s=0.0001)
    checks.start()
    try:
        good = _write(tmp_path, "good.onnx", tiny_model().SerializeToString())
        with pytest.raises(IntakeTimeout, match="took longer than"):
            checks.check(good, TINY_TASK)
        assert _worker_pids() == []  # killed and reaped
    finally:
        checks.stop(5)


def test_no_more_workers_than_the_pool_size_run_at_once(
    pool: StaticCheckPool, tmp_path: Path
) -> None:
    models = [
        _write(tmp_path, f"m{i}.onnx", tiny_model(seed=i).SerializeToString()) for i in range(8)
    ]
    seen: list[int] = []
    errors: list[BaseException] = []

    def check(path: Path) -> None:
        try:
            pool.check(path, TINY_TASK)
            seen.append(len(_worker_pids()))
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=check, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(seen) == 8 and max(seen) <= 2


def test_a_stopped_pool_refuses_with_a_retryable_error_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    checks = StaticCheckPool(IntakeLimits(), workers=2)
    checks.start()
    good = _write(tmp_path, "good.onnx", tiny_model().SerializeToString())
    checks.check(good, TINY_TASK)
    checks.stop(5)
    assert _worker_pids() == []
    with pytest.raises(ServerUnavailable, match="shutting down"):
        checks.check(good, TINY_TASK)


def test_a_busy_worker_dies_with_a_server_killed_outright(tmp_path: Path) -> None:
    # A server killed by SIGKILL runs no cleanup, and a worker busy on a model does not
    # read its closed stdin: the kernel's parent-death signal must end it. A FIFO
    # keeps the worker inside its check.
    fifo = tmp_path / "stuck.onnx"
    os.mkfifo(fifo)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from free_common.models.onnx_static import IntakeLimits\n"
        "from free_server.static_checks import StaticCheckPool\n"
        "pool = StaticCheckPool(IntakeLimits(), workers=1)\n"
        "pool.start()\n"
        "pool.check(Path(sys.argv[1]), None)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script, str(fifo)])
    workers: list[int] = []
    try:
        worker = "free_common.models.static_worker"
        assert wait_until(
            lambda: bool(workers.extend(child_pids(worker, server.pid)) or workers), 20
        )
        server.kill()
        server.wait(10)
        exited = wait_until(lambda: _state(workers[0]) in (None, "Z", "X"), 10)
        assert exited, "the worker outlived it"
    finally:
        server.kill()
        server.wait(10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str | None:
    """A process's state letter ("Z": exited, not yet reaped); None once it is gone."""
    stat = process_stat(pid)
    return None if stat is None else stat[0]
