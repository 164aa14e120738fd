"""The aggregator's side of the Flower plane, without processes: front policy, presets, requests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flower_harness import BIN, ENV, TINY_PRESET, add_owner, flower_home, free_port

from free_common.errors import ConfigError
from free_server.commands.run import run
from free_server.fleet_front import FLEET_PATHS, refusal
from free_server.flower_runs import FlowerRuns
from free_server.home import ServerHome
from free_server.node_sync import allowed_node_keys, node_key_pem
from free_server.rounds import engine_config, known_presets
from free_server.scheduler import RoundScheduler, SchedulerSettings
from free_server.superlink import SuperLinkSettings, SuperLinkSupervisor


@pytest.fixture
def home(tmp_path: Path) -> ServerHome:
    return flower_home(tmp_path / "home")


def test_front_forwards_exactly_the_twelve_fleet_routes_by_post() -> None:
    assert len(FLEET_PATHS) == 12
    for path in FLEET_PATHS:
        assert refusal("POST", path, b"") is None


@pytest.mark.parametrize(
    ("method", "path", "query", "why"),
    [
        ("POST", b"/v1/control/start-run", b"", "Control API is not served"),
        ("POST", b"/v1/control/register-node", b"", "Control API is not served"),
        ("POST", b"/v1/runtime/pull-messages", b"", "only Flower's Fleet API"),
        ("POST", b"/v1/fleet/../control/start-run", b"", "only Flower's Fleet API"),
        ("POST", b"/v1/fleet/%2e%2e/control/start-run", b"", "only Flower's Fleet API"),
        ("POST", b"/v1/fleet//get-run", b"", "only Flower's Fleet API"),
        ("POST", b"/v1/fleet/get-run/", b"", "only Flower's Fleet API"),
        ("POST", b"/V1/FLEET/GET-RUN", b"", "only Flower's Fleet API"),
        ("POST", b"/v1/fleet/get-run", b"x=1", "only Flower's Fleet API"),
        ("GET", b"/v1/fleet/get-run", b"", "POST only"),
        ("PUT", b"/v1/fleet/push-object", b"", "POST only"),
        ("GET", b"/docs", b"", "only Flower's Fleet API"),
        ("GET", b"/health", b"", "only Flower's Fleet API"),
    ],
)
def test_front_refuses_everything_else(method: str, path: bytes, query: bytes, why: str) -> None:
    reason = refusal(method, path, query)
    assert reason is not None and why in reason


def test_home_presets_change_an_engine_preset(home: ServerHome) -> None:
    config = engine_config("tiny", home)
    assert config.preset == "tiny"
    assert (config.learner.arch, config.learner.channels, config.steps) == ("mlp", 1, 4)
    assert config.five.augment.crop_padding == 1
    assert config.five.betas == (0.5, 0.999)  # lists in JSON come back as tuples
    assert engine_config("smoke", home).preset == "smoke"
    assert known_presets(home) == ["smoke", "cpu", "paper", "tiny"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"base": "huge"}, "base 'huge' is not one of"),
        ({"steps": 3}, '"base"'),
        ({**TINY_PRESET, "stepz": 3}, "unknown setting 'stepz'"),
        ({**TINY_PRESET, "learner": 3}, "learner must be an object"),
        ({**TINY_PRESET, "warmup_steps": 99}, "warmup_steps must be at least 0 and below steps"),
    ],
)
def test_bad_preset_files_are_one_clear_line(
    home: ServerHome, content: dict[str, object], message: str
) -> None:
    (home.root / "presets" / "bad.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        engine_config("bad", home)


def test_unknown_preset_names_the_known_ones(home: ServerHome) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope': use one of smoke, cpu, paper"):
        run(home.root, "nope")
    with home.open_store() as store:
        assert store.next_round_request() is None


def test_run_writes_a_round_request(home: ServerHome, capsys: pytest.CaptureFixture[str]) -> None:
    default = home.config.rounds.preset
    (home.root / "presets" / f"{default}.json").write_text('{"base": "smoke"}')
    run(home.root, "tiny")
    run(home.root, None)  # the home's rounds.preset
    with home.open_store() as store:
        requests = store.rounds("requested")
    assert [(r.id, r.preset) for r in requests] == [(1, "tiny"), (2, default)]
    assert "round 1 requested (preset tiny)" in capsys.readouterr().out


def test_run_without_a_home_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "free-server"), "run", "--home", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no server home at {tmp_path / 'none'}: run `free-server init --home"
        f" {tmp_path / 'none'}` first"
    ]


def test_only_active_owners_node_keys_are_allowed(home: ServerHome, tmp_path: Path) -> None:
    alice = add_owner(home, tmp_path, "alice")
    add_owner(home, tmp_path, "bob")
    with home.open_store() as store:
        store.revoke_client("bob")
        store.add_client("carol", key_id="c" * 32, public_key_pem="unused")  # no node key
        clients = store.list_clients()
    allowed = allowed_node_keys(clients)
    assert list(allowed.values()) == ["alice"]
    pem = node_key_pem(alice.keys.node_pub.read_text().strip())
    assert pem is not None and pem.startswith(b"-----BEGIN PUBLIC KEY-----") and pem in allowed
    assert node_key_pem("ssh-ed25519 AAAA not-a-key") is None


def test_a_round_left_running_by_a_crash_is_requested_again(home: ServerHome) -> None:
    with home.open_store() as store:
        crashed = store.request_round("tiny")
        store.start_round(crashed.id)
        supervisor = SuperLinkSupervisor(home, store, SuperLinkSettings(port=free_port()))
        scheduler = RoundScheduler(
            home, store, FlowerRuns(supervisor), SchedulerSettings(min_models=1, preset="tiny")
        )
        scheduler.start()  # the SuperLink is not up: nothing can be launched
        scheduler.stop(0.0)
        rounds = store.rounds()
    assert [(r.id, r.state, r.preset) for r in rounds] == [
        (1, "failed", "tiny"),
        (2, "requested", "tiny"),
    ]
    assert rounds[0].error is not None and rounds[0].error.startswith("interrupted")
