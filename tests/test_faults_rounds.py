"""A meta round killed with SIGKILL resumes from its last checkpoint and ends in the same release.

Level, stated plainly: the round runs the server's own round code on a real server
home, `free_server.rounds.run_meta_round` (accepted ONNX submissions from the store,
converted, into the engine in ``HOME/engine``) then `free_server.release.
publish_release` (signed release in the store), in a subprocess that is killed
with SIGKILL in the middle of the round (after the step-2 checkpoint of a 4-step
round). A second process, the restart, runs the same calls on the same home; it
must resume at step 2 and publish weights identical, byte for byte, to those of an
uninterrupted round on a copy of the home made before the kill. The Flower
ServerApp that makes these calls in production, and the scheduler that marks an
interrupted round failed and requests it again at the next start, are covered by
`test_flower_plane.py` and `test_flower_server.py::
test_a_round_left_running_by_a_crash_is_requested_again`; the engine's own
kill-and-resume test is `test_engine_checkpoint.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flower_harness import add_accepted_teachers, add_owner, flower_home
from test_faults_exchange import assert_acknowledged_intact

from free_common.engine.checkpoint import CHECKPOINT_FILE
from free_common.security.canonical import record_from_canonical
from free_common.security.keys import load_private_key, load_public_key
from free_common.security.signing import verify
from free_common.types import Receipt, ReleaseManifest, Signed
from free_server.home import ServerHome
from free_server.release import publish_release
from free_server.rounds import ENGINE_DIR, run_meta_round
from free_server.scheduler import INTERRUPTED
from free_server.submission import receipt_for

pytestmark = pytest.mark.slow

KILL_AT_STEP = 3

_ROUND = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from free_common.engine import RoundStarted, StepFinished
    from free_common.security.keys import load_private_key
    from free_server.home import ServerHome
    from free_server.release import publish_release
    from free_server.rounds import run_meta_round

    home = ServerHome.open(Path(sys.argv[1]))
    round_id, kill_at = int(sys.argv[2]), int(sys.argv[3])
    started = []

    def on_event(event):
        if isinstance(event, RoundStarted):
            started.append({"resumed": event.resumed, "start_step": event.start_step})
        if isinstance(event, StepFinished) and event.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    with home.open_store() as store:
        output = run_meta_round(home, store, "tiny", device="cpu", on_event=on_event)
        row, _ = publish_release(
            store, output, load_private_key(home.signing_key), round_id=round_id
        )
    print(json.dumps({"version": row.version, "started": started[0], "fresh": output.fresh}))
    """
)


def _round_process(
    home: ServerHome, round_id: int, kill_at: int = 0
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _ROUND, str(home.root), str(round_id), str(kill_at)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _receipts(home: ServerHome) -> list[Signed[Receipt]]:
    key = load_private_key(home.signing_key)
    with home.open_store() as store:
        return [receipt_for(row, key) for row in store.summary(recent=1000).submissions]


def _release(home: ServerHome, version: int) -> ReleaseManifest:
    with home.open_store() as store:
        row = store.release(version)
    record = record_from_canonical(row.manifest, ReleaseManifest)
    verify(load_public_key(home.signing_pub), Signed(record, row.signature))
    return record


def test_meta_round_killed_mid_round_resumes_and_publishes_the_same_release(tmp_path: Path) -> None:
    home = flower_home(tmp_path / "killed")
    alice, bob = add_owner(home, tmp_path, "alice"), add_owner(home, tmp_path, "bob")
    add_accepted_teachers(home, alice, [1, 2])
    add_accepted_teachers(home, bob, [3])
    acknowledged = _receipts(home)
    shutil.copytree(home.root, tmp_path / "whole")
    whole = ServerHome.open(tmp_path / "whole")

    with home.open_store() as store:
        first = store.request_round("tiny")
        store.start_round(first.id)
    killed = _round_process(home, first.id, kill_at=KILL_AT_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = json.loads((home.root / ENGINE_DIR / CHECKPOINT_FILE).read_text())
    assert (checkpoint["step"], checkpoint["finished"]) == (2, False)
    with home.open_store() as store:
        assert store.latest_release() is None
        assert store.round(first.id).state == "running"
        # What the scheduler does with a round a dead server left running.
        store.finish_round(first.id, INTERRUPTED)
        again = store.request_round("tiny")
        store.start_round(again.id)
    assert_acknowledged_intact(home, acknowledged)

    restarted = _round_process(home, again.id)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    report = json.loads(restarted.stdout.strip().splitlines()[-1])
    assert report["started"] == {"resumed": True, "start_step": 2}
    assert report["fresh"] is False

    with whole.open_store() as store:
        straight = store.request_round("tiny")
        store.start_round(straight.id)
        uninterrupted = run_meta_round(whole, store, "tiny", device="cpu")
        key = load_private_key(whole.signing_key)
        row, _ = publish_release(store, uninterrupted, key, round_id=straight.id)
    resumed, reference = _release(home, report["version"]), _release(whole, row.version)
    assert resumed.payload_sha256 == reference.payload_sha256
    assert resumed.payload_size == reference.payload_size
    assert resumed.source_submission_ids == reference.source_submission_ids == ("1", "2", "3")
    config, expected = json.loads(resumed.config_json), json.loads(reference.config_json)
    assert config == expected  # seed, steps, selected step, engine settings, "fresh": false
    assert_acknowledged_intact(home, acknowledged)
