"""kill -9 of the whole server in the middle of a meta round, at the level a user meets it.

The server is `free-server start` with its Flower plane (SuperLink, SuperExec, the
round's ServerApp), a real process; the round is asked for with `free-server run`.
Once the engine's checkpoint in ``HOME/engine`` shows a step past the first
checkpoint and the round is still going, every process of that server gets SIGKILL
at once: its own process group (the exchange, the intake workers) and the Flower
processes, which Flower puts in sessions of their own (they are found by the
``FLWR_HOME`` of the home). `free-server start` again on the same home must request
the interrupted round again, resume the engine at the checkpoint (its round log
says so) and publish a release whose weights are, byte for byte, those of the same
round run without a crash: `free-server start` on a copy of the home made before
the first start. Every acknowledged submission is intact afterwards, and no process
of any of these servers is left running.

The same crash one level down (the round code in a subprocess, no Flower) is
`test_faults_rounds.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from flower_harness import (
    BIN,
    ENV,
    TINY_PRESET,
    add_accepted_teachers,
    add_owner,
    flower_home,
    free_port,
    wait_until,
)
from test_faults_exchange import assert_acknowledged_intact
from test_faults_rounds import _receipts, _release
from test_flower_plane import _request_round, _wait_round

from free_common.engine.checkpoint import CHECKPOINT_FILE
from free_server.home import ServerHome
from free_server.rounds import ENGINE_DIR
from free_server.scheduler import INTERRUPTED
from free_server.superlink import SuperLinkPaths

pytestmark = [
    pytest.mark.slow,
    # flwr's app builder (imported with test_flower_plane) uses a deprecated pathspec type.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*"),
]

STEPS = 60
"""Steps of the round: long enough to be killed between its first checkpoint and its end."""
CHECKPOINT_EVERY = 2
READY = "stop with Ctrl-C or SIGTERM"
ROUND_TIMEOUT_S = 240.0


@dataclass
class Server:
    """One `free-server start` process and where its output goes."""

    home: ServerHome
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _home(root: Path) -> ServerHome:
    """A loopback home whose `tiny` preset is long enough to be killed mid-round."""
    flower_home(root)
    longer = {**TINY_PRESET, "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY}
    (root / "presets" / "tiny.json").write_text(json.dumps(longer))
    config = root / "config.toml"
    text = config.read_text()
    assert "superlink_port = 9093" in text
    config.write_text(text.replace("superlink_port = 9093", f"superlink_port = {free_port()}"))
    return ServerHome.open(root)


def _processes(home: ServerHome, server_pid: int) -> set[int]:
    """Live processes of one server: its process group and its home's Flower processes.

    Flower starts the SuperExec, and the SuperExec each ServerApp, in sessions of
    their own; all of them carry the ``FLWR_HOME`` the server gives them, which no
    other home's processes have.
    """
    flwr_home = SuperLinkPaths.of(home).flwr_home
    markers = {f"FLWR_HOME={p}".encode() for p in (flwr_home, flwr_home.resolve())}
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # "pid (command) state ppid pgrp ...": the command may hold spaces.
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if state in ("Z", "X"):
                continue
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue  # exited meanwhile
        if int(group) == server_pid or markers & environ:
            found.add(int(entry.name))
    return found


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """The servers a test starts; whatever is left of them is killed at the end."""
    started: list[Server] = []
    yield started
    for server in started:
        for pid in _processes(server.home, server.process.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=30)


def _start(home: ServerHome, name: str, servers: list[Server]) -> Server:
    """`free-server start` with Flower on free ports; returns once it serves."""
    log = home.root.parent / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(BIN / "free-server"),
                "start",
                "--home",
                str(home.root),
                "--port",
                "0",
                "--flower-port",
                str(free_port()),
                # Rounds start only when asked for (or requested again after a crash).
                "--min-models",
                "1000",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=ENV,
            # Its own group, as in a shell: a crash can then take the whole group.
            start_new_session=True,
        )
    server = Server(home, process, log)
    servers.append(server)
    up = wait_until(lambda: process.poll() is not None or READY in server.output(), 120)
    assert up and process.poll() is None, f"{name} did not come up:\n{server.output()[-3000:]}"
    return server


def _stop(server: Server) -> None:
    """SIGTERM, as an operator stops it; it must end cleanly with all its processes."""
    server.process.terminate()
    code = server.process.wait(timeout=120)
    assert code == 0, server.output()[-3000:]
    gone = wait_until(lambda: not _processes(server.home, server.process.pid), 30)
    assert gone, f"left running after a clean stop: {_processes(server.home, server.process.pid)}"


def _checkpoint(home: ServerHome) -> tuple[int, bool] | None:
    """(step, finished) of the engine's checkpoint, or None while there is none."""
    try:
        record = json.loads((home.root / ENGINE_DIR / CHECKPOINT_FILE).read_text())
    except (OSError, ValueError):
        return None  # not written yet
    return int(record["step"]), bool(record["finished"])


def _crash_mid_round(server: Server) -> int:
    """SIGKILL every process of `server` once the round is past its first checkpoint."""
    home = server.home

    def past_first_checkpoint() -> bool:
        checkpoint = _checkpoint(home)
        return checkpoint is not None and checkpoint[0] >= CHECKPOINT_EVERY

    assert wait_until(past_first_checkpoint, ROUND_TIMEOUT_S, step_s=0.02), (
        f"no engine checkpoint:\n{server.output()[-3000:]}"
    )
    family = _processes(home, server.process.pid)
    for pid in family:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert server.process.wait(timeout=30) == -signal.SIGKILL
    gone = wait_until(lambda: not _processes(home, server.process.pid), 30)
    assert gone, f"left running after SIGKILL: {_processes(home, server.process.pid)}"
    checkpoint = _checkpoint(home)
    assert checkpoint is not None
    step, finished = checkpoint
    assert not finished and CHECKPOINT_EVERY <= step < STEPS, (
        f"the kill came too late (checkpoint {checkpoint}): make STEPS larger"
    )
    return step


def _round_log(home: ServerHome, round_id: int) -> str:
    return SuperLinkPaths.of(home).round_log(round_id).read_text(errors="replace")


def test_server_killed_mid_round_resumes_at_restart_and_publishes_the_same_release(
    tmp_path: Path, servers: list[Server]
) -> None:
    home = _home(tmp_path / "killed")
    alice, bob = add_owner(home, tmp_path, "alice"), add_owner(home, tmp_path, "bob")
    add_accepted_teachers(home, alice, [1, 2])
    add_accepted_teachers(home, bob, [3])
    acknowledged = _receipts(home)
    whole = ServerHome.open(shutil.copytree(home.root, tmp_path / "whole"))

    first = _start(home, "first", servers)
    crashed = _request_round(home)
    resume_step = _crash_mid_round(first)
    with home.open_store() as store:
        assert store.latest_release() is None
        assert store.round(crashed).state == "running"  # as the dead server left it
    assert_acknowledged_intact(home, acknowledged)

    restarted = _start(home, "restarted", servers)
    with home.open_store() as store:
        rounds = store.rounds()
    assert [(r.id, r.state, r.error) for r in rounds[:1]] == [(crashed, "failed", INTERRUPTED)]
    assert [(r.preset, r.state in ("requested", "running")) for r in rounds[1:]] == [
        ("tiny", True)
    ], rounds
    again = rounds[1].id
    state = _wait_round(home, again, ROUND_TIMEOUT_S)
    assert state == "finished", _round_log(home, again)[-3000:]
    log = _round_log(home, again)
    resumed = re.search(rf"engine round \d+: {STEPS} steps from step (\d+), .*\(resumed\)", log)
    assert resumed is not None, log[-3000:]
    assert int(resumed.group(1)) == resume_step
    _stop(restarted)

    reference = _start(whole, "reference", servers)
    straight = _request_round(whole)
    assert _wait_round(whole, straight, ROUND_TIMEOUT_S) == "finished"
    assert f"{STEPS} steps from step 0," in _round_log(whole, straight)
    _stop(reference)

    with home.open_store() as store, whole.open_store() as other:
        release, expected = store.latest_release(), other.latest_release()
        assert release is not None and expected is not None
        assert (release.version, release.round_id) == (1, again)
        weights = store.blob_path(release.sha256).read_bytes()
        assert weights == other.blob_path(expected.sha256).read_bytes()
    manifest, reference_manifest = _release(home, 1), _release(whole, 1)
    assert manifest.payload_sha256 == reference_manifest.payload_sha256
    assert manifest.source_submission_ids == reference_manifest.source_submission_ids
    assert manifest.source_submission_ids == ("1", "2", "3")
    config = json.loads(manifest.config_json)
    assert config == json.loads(reference_manifest.config_json)  # seed, steps, "fresh": false
    assert config["fresh"] is False and config["steps"] == STEPS
    assert_acknowledged_intact(home, acknowledged)


def test_flower_processes_end_when_only_the_server_is_killed(
    tmp_path: Path, servers: list[Server]
) -> None:
    # The OOM killer takes the server process alone: the SuperLink (its own session)
    # must not outlive it and keep the Flower port, or the next start cannot bind it.
    home = _home(tmp_path / "home")
    first = _start(home, "first", servers)
    flower = _processes(home, first.process.pid) - {first.process.pid}
    assert flower, "no Flower process found"
    first.process.kill()
    assert first.process.wait(timeout=30) == -signal.SIGKILL
    orphans = lambda: _processes(home, first.process.pid) & flower  # noqa: E731
    assert wait_until(lambda: not orphans(), 30), f"Flower outlived the server: {orphans()}"
    _stop(_start(home, "restarted", servers))
