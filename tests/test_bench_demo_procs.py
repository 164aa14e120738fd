"""The demo's process handling: logs, one-line failures, and nothing left running."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from free_common.bench.demo import DemoConfig
from free_common.bench.demo_procs import Processes, free_ports
from free_common.errors import ConfigError, DemoError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not waited yet).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def test_a_failed_command_is_one_line_naming_its_log(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "logs", {"DEMO_WORD": "hello"})
    done = procs.run("ok", ["sh", "-c", "echo $DEMO_WORD"])
    assert done.stdout == "hello\n"
    with pytest.raises(DemoError) as failed:
        procs.run("bad", ["sh", "-c", "echo working; echo 'no such thing' >&2; exit 3"])
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("bad failed (exit 3): no such thing; log: ")
    assert "working" in (tmp_path / "logs" / "bad.log").read_text()


def test_stop_all_ends_whole_process_groups(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "logs", {})
    child = tmp_path / "child.pid"
    started = procs.start(
        "server", ["sh", "-c", f"sleep 300 & echo $! > {child}; echo ready; wait"]
    )
    started.wait_for("ready", 10.0)
    grandchild = int(child.read_text())
    assert _alive(grandchild)
    procs.stop_all()
    assert started.process.returncode is not None
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert procs.background == []


def test_waiting_on_a_process_that_exits_or_stays_silent_fails(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "logs", {})
    gone = procs.start("gone", ["sh", "-c", "echo bye; exit 4"])
    with pytest.raises(DemoError, match=r"gone exited \(4\): bye"):
        gone.wait_for("ready", 10.0)
    silent = procs.start("silent", ["sleep", "30"])
    with pytest.raises(DemoError, match="did not say 'ready' within 0 s"):
        silent.wait_for("ready", 0.3)
    procs.stop_all()


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3


def test_the_demo_needs_an_owner_who_did_not_join() -> None:
    with pytest.raises(ConfigError, match="--joined must be below --owners"):
        DemoConfig(owners=2, joined=2)
    with pytest.raises(ConfigError, match="at least 2"):
        DemoConfig(owners=1, joined=0)
