"""The intake fork server: a fresh, isolated worker per model, forked from a pre-imported one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from exchange_harness import child_pids, intake_worker_pids, process_stat, wait_until
from onnx_builders import tiny_model

from free_common.models.intake import run_intake
from free_common.models.intake_forkserver import fork_worker

_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def _fork_servers() -> list[int]:
    return child_pids("free_common.models.intake_forkserver")


def _gone(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is None or stat[0] == "Z"


def test_a_worker_runs_isolated_in_its_own_folder_at_its_own_priority(tmp_path: Path) -> None:
    worker = fork_worker(str(tmp_path), 3, _ENV)
    try:
        # It blocks on its stdin, which nobody has written yet.
        assert wait_until(lambda: len(intake_worker_pids()) == 1, 30)
        (pid,) = intake_worker_pids()
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
        (server,) = _fork_servers()
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, server) + 3
        # Its stdio are its own pipes, and no other pipe or socket (the fork server's control
        # socket, other models' pipes) is open in it; onnxruntime opens a file of its own.
        links = {
            int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
        }
        assert all(links[fd].startswith("pipe:") for fd in (0, 1, 2)), links
        inherited = [v for fd, v in links.items() if fd > 2 and v.startswith(("pipe:", "socket:"))]
        assert inherited == [], links
    finally:
        worker.kill()
        _, _, returncode = worker.communicate(10)
        worker.close()
    assert returncode == -signal.SIGKILL


def test_the_fork_server_stays_single_threaded_so_forking_it_is_safe() -> None:
    assert run_intake(tiny_model().SerializeToString()).accepted
    (server,) = _fork_servers()
    assert os.listdir(f"/proc/{server}/task") == [str(server)]


def test_closing_the_callers_side_kills_the_worker(tmp_path: Path) -> None:
    worker = fork_worker(str(tmp_path), 0, _ENV)
    assert wait_until(lambda: len(intake_worker_pids()) == 1, 30)
    (pid,) = intake_worker_pids()
    worker.close()
    assert wait_until(lambda: _gone(pid), 10)


def test_a_dead_fork_server_is_started_again() -> None:
    assert run_intake(tiny_model().SerializeToString()).accepted
    (server,) = _fork_servers()
    os.kill(server, signal.SIGKILL)
    assert wait_until(lambda: _gone(server), 10)
    result = run_intake(tiny_model().SerializeToString())
    assert result.accepted, result.reason
    assert _fork_servers() not in ([], [server])


def test_a_killed_worker_reports_its_signal_however_late_the_caller_reads(tmp_path: Path) -> None:
    # The server used to close the status socket with the caller's "kill" unread,
    # which resets the caller's end: a caller reading the exit status after that
    # close got ECONNRESET instead.
    for settle_s in (0.0, 0.3):
        worker = fork_worker(str(tmp_path), 0, _ENV)
        try:
            assert wait_until(lambda: len(intake_worker_pids()) == 1, 30)
            worker.kill()
            worker.kill()  # twice, as a caller racing the worker's end may
            time.sleep(settle_s)  # long enough for the server to have reaped the worker
            _, _, returncode = worker.communicate(10)
        finally:
            worker.close()
        assert returncode == -signal.SIGKILL
