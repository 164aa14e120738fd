"""The Flower control plane for real: SuperLink, TLS front, scheduler, joined SuperNodes.

One deployment per module (it takes seconds to bring up): the server's Flower
plane in this process on free loopback ports, and `free-client join` processes
for two enrolled owners with local data. The tests run in file order; the last
one kills a SuperNode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from flower_harness import (
    BIN,
    ENV,
    Owner,
    add_accepted_teachers,
    add_owner,
    flower_home,
    join_log,
    owner_data,
    running_plane,
    start_join,
    stop_join,
    wait_until,
)
from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, StartRunRequest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab

from free_common.security.keys import load_public_key
from free_common.security.release_dir import load_release
from free_server.flower_plane import FlowerPlane
from free_server.home import ServerHome
from free_server.superlink import SuperLinkPaths

pytestmark = [
    pytest.mark.slow,
    # flwr's app builder uses a pathspec pattern type that pathspec deprecates.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*"),
]

REPLY_TIMEOUT_S = 15.0


@dataclass
class Deployment:
    root: Path
    home: ServerHome
    plane: FlowerPlane
    alice: Owner
    bob: Owner
    joins: dict[str, subprocess.Popen[bytes]]


def _online(plane: FlowerPlane) -> dict[str, str]:
    with plane.superlink.control() as control:
        nodes = control.ListNodes(ListNodesRequest()).nodes_info
    return {node.name: node.status for node in nodes}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("flower")
    home = flower_home(root / "home")
    alice, bob = add_owner(home, root, "alice"), add_owner(home, root, "bob")
    add_accepted_teachers(home, alice, [1, 2])
    add_accepted_teachers(home, bob, [3])
    data = owner_data(root / "data")
    with running_plane(home, reply_timeout_s=REPLY_TIMEOUT_S) as plane:
        joins = {o.name: start_join(o, plane.front.address, home, data=data) for o in (alice, bob)}
        try:
            online = wait_until(
                lambda: _online(plane) == {"alice": "online", "bob": "online"}, 90, step_s=0.5
            )
            assert online, f"{_online(plane)}\n{join_log(alice)[-2000:]}"
            yield Deployment(root, home, plane, alice, bob, joins)
        finally:
            for process in joins.values():
                stop_join(process)


def _wait_round(home: ServerHome, round_id: int, timeout_s: float = 120.0) -> str:
    def ended() -> bool:
        with home.open_store() as store:
            return store.round(round_id).state in ("finished", "failed")

    assert wait_until(ended, timeout_s, step_s=0.5), f"round {round_id} did not end"
    with home.open_store() as store:
        row = store.round(round_id)
    if row.state == "failed":
        # Say why in the test's own failure, which is all CI keeps.
        log = SuperLinkPaths.of(home).round_log(round_id)
        tail = log.read_text()[-3000:] if log.is_file() else "(no round log)"
        print(f"round {round_id} failed: {row.error}\n{tail}")
    return row.state


def _request_round(home: ServerHome) -> int:
    done = subprocess.run(
        [str(BIN / "free-server"), "run", "--home", str(home.root), "--preset", "tiny"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[0] == "round", done.stdout
    return int(words[1])


def test_superlink_listens_on_loopback_only_with_tls(deployment: Deployment) -> None:
    superlink = deployment.plane.superlink
    context = ssl.create_default_context(cafile=str(deployment.home.ca_cert))
    assert httpx.get(f"{superlink.url}/health", verify=context).status_code == 200
    with pytest.raises(httpx.HTTPError):  # plaintext is not served
        httpx.get(f"http://{superlink.address}/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a CA the SuperLink's certificate is not from
        httpx.get(f"{superlink.url}/health", verify=ssl.create_default_context(), timeout=5)
    # Nothing answers on the machine's other addresses.
    other = socket.gethostbyname(socket.gethostname())
    if not other.startswith("127."):
        with pytest.raises(OSError), socket.create_connection((other, superlink.settings.port), 2):
            pass
    assert superlink.paths.database.is_file()  # state in SQLite inside the home


def test_registered_supernodes_connect_through_the_front(deployment: Deployment) -> None:
    assert _online(deployment.plane) == {"alice": "online", "bob": "online"}
    assert deployment.plane.front.settings.upstream_port == deployment.plane.superlink.settings.port
    assert "SuperNode ID" in join_log(deployment.alice)
    # Both SuperNodes' signed heartbeats went through the front (the console's metric).
    assert wait_until(lambda: deployment.plane.front.nodes.count(60) == 2, 30)


def test_unregistered_node_key_is_refused(deployment: Deployment) -> None:
    mallory = add_owner(deployment.home, deployment.root, "mallory", enrolled=False)
    process = start_join(mallory, deployment.plane.front.address, deployment.home)
    code = process.wait(timeout=90)
    log = join_log(mallory)
    assert code == 4, log[-2000:]  # SecurityError
    assert "does not accept the node key" in log
    assert "mallory" not in _online(deployment.plane)


def test_revoked_owner_loses_its_node_registration(deployment: Deployment) -> None:
    carol = add_owner(deployment.home, deployment.root, "carol")
    plane = deployment.plane
    assert wait_until(lambda: "carol" in _online(plane), 10)
    with deployment.home.open_store() as store:
        store.revoke_client(carol.name)
    assert wait_until(lambda: _online(plane).get("carol", "unregistered") == "unregistered", 10)


def test_flower_runs_through_the_front_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    front = deployment.plane.front.address
    ca = deployment.home.ca_cert
    # The flwr CLI itself, pointed at the owner-facing address.
    flwr_home = tmp_path / "flwr"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "front"\n[superlink.front]\naddress = "{front}"\n'
        f'root-certificates = "{ca}"\n'
    )
    app = _other_app(tmp_path / "app", tmp_path / "unused.json", tmp_path / "PWNED")
    done = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "front"],
        capture_output=True,
        text=True,
        env={**ENV, "FLWR_HOME": str(flwr_home)},
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "403 Forbidden" in done.stdout + done.stderr
    # The refusal says why.
    client = ControlHttpClient.from_server_address(front, False, ca.read_bytes(), [])
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.ListRuns(ListRunsRequest())
    finally:
        client.close()
    assert refused.value.response.status_code == 403
    assert "Control API is not served" in refused.value.response.text
    # Paths that only look like Fleet routes, other methods, the other APIs.
    context = ssl.create_default_context(cafile=str(ca))
    host, port = front.rsplit(":", 1)
    for method, path in [
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet//get-run"),
        ("POST", "/v1/fleet/get-run?x=1"),
        ("GET", "/v1/fleet/get-run"),
        ("POST", "/v1/runtime/get-nodes"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/health"),
    ]:
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        connection.request(method, path, body=b"" if method == "POST" else None)
        assert connection.getresponse().status == 403, (method, path)
        connection.close()
    assert not (tmp_path / "PWNED").exists()


def test_round_pushes_a_signed_release_and_records_fine_tuning(deployment: Deployment) -> None:
    home = deployment.home
    round_id = _request_round(home)
    assert _wait_round(home, round_id) == "finished"
    with home.open_store() as store:
        release = store.latest_release()
        evaluations = {e.node_id: e.metrics for e in store.evaluations(round_id)}
    assert release is not None and release.round_id == round_id
    assert set(evaluations) == {"alice", "bob"}
    pinned = load_public_key(home.signing_pub)
    for owner in (deployment.alice, deployment.bob):
        metrics = evaluations[owner.name]
        assert metrics["version"] == release.version and metrics["stored"] == 1.0
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["episodes"] == 3
        manifest, weights = load_release(owner.folder / "releases" / str(release.version), pinned)
        assert (
            manifest.payload_sha256
            == release.sha256
            == hashlib.sha256(weights.read_bytes()).hexdigest()
        )
        assert set(manifest.source_submission_ids) == {"1", "2", "3"}
        assert json.loads(manifest.config_json)["architecture"]["arch"] == "mlp"


def test_a_round_on_two_ranks_is_published_and_pushed(deployment: Deployment) -> None:
    """`free-server start --workers 2`: the scheduler's runs carry the count to the ServerApp."""
    scheduler = deployment.plane.scheduler
    single = scheduler.settings
    scheduler.settings = dataclasses.replace(single, workers=2)
    try:
        round_id = _request_round(deployment.home)
        assert _wait_round(deployment.home, round_id, timeout_s=240.0) == "finished"
    finally:
        scheduler.settings = single
    log_text = SuperLinkPaths.of(deployment.home).round_log(round_id).read_text()
    assert "rank 0 published release" in log_text
    with deployment.home.open_store() as store:
        release = store.latest_release()
        evaluations = {e.node_id for e in store.evaluations(round_id)}
    assert release is not None and release.round_id == round_id
    assert evaluations == {"alice", "bob"}


def _other_app(folder: Path, out: Path, marker: Path) -> Path:
    """A Flower app of another bundle: its ClientApp would leave `marker` if it ever ran."""
    package = folder / "otherapp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "client_app.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    (package / "server_app.py").write_text(
        "import json\n"
        "from flwr.app import ConfigRecord, Message, RecordDict\n"
        "from flwr.serverapp import ServerApp\n"
        "app = ServerApp()\n"
        "@app.main()\n"
        "def main(grid, context):\n"
        "    nodes = list(grid.get_node_ids())\n"
        "    messages = [Message(RecordDict({'c': ConfigRecord({'x': 1})}), dst_node_id=n,"
        " message_type='query') for n in nodes]\n"
        "    replies = list(grid.send_and_receive(messages, timeout=60))\n"
        "    found = [r.error.reason if r.has_error() else 'ok' for r in replies]\n"
        "    with open(context.run_config['out'], 'w') as handle:\n"
        "        json.dump({'nodes': len(nodes), 'replies': found}, handle)\n"
    )
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "otherapp"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "someone"\n'
        '[tool.flwr.app.components]\nserverapp = "otherapp.server_app:app"\n'
        'clientapp = "otherapp.client_app:app"\n'
        f'[tool.flwr.app.config]\nout = "{out}"\n'
    )
    return folder


def test_a_run_of_another_app_bundle_is_refused_by_joined_nodes(
    deployment: Deployment, tmp_path: Path
) -> None:
    out, marker = tmp_path / "replies.json", tmp_path / "PWNED"
    fab = build_fab_from_disk(_other_app(tmp_path / "app", out, marker))
    request = StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
        override_config=user_config_to_proto({"out": str(out)}),
        federation="",
    )
    with deployment.plane.superlink.control() as control:  # the aggregator's own loopback
        control.StartRun(request)
    assert wait_until(out.exists, 120, step_s=0.5)
    result = json.loads(out.read_text())
    assert result["nodes"] == 2
    assert len(result["replies"]) == 2
    assert all("AppBundleRefused" in reply for reply in result["replies"]), result
    assert not marker.exists()  # the other bundle's code never ran on a SuperNode


def test_a_killed_supernode_does_not_fail_the_round(deployment: Deployment) -> None:
    home = deployment.home
    stop_join(deployment.joins["bob"], kill=True)
    round_id = _request_round(home)
    assert _wait_round(home, round_id, timeout_s=REPLY_TIMEOUT_S + 120) == "finished"
    with home.open_store() as store:
        evaluations = [e.node_id for e in store.evaluations(round_id)]
        release = store.latest_release()
    assert evaluations == ["alice"]
    assert release is not None and release.round_id == round_id
    assert (
        deployment.alice.folder / "releases" / str(release.version) / "meta.safetensors"
    ).is_file()
    assert not (deployment.bob.folder / "releases" / str(release.version)).exists()


def test_a_superlink_that_dies_is_restarted_with_its_registrations(
    deployment: Deployment,
) -> None:
    superlink = deployment.plane.superlink
    pid = superlink.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: superlink.restarts == 1 and superlink.ready(), 60, step_s=0.5)
    assert superlink.pid not in (None, pid)
    # Registrations live in the SQLite state: the allow-list's nodes are still known.
    assert {"alice", "bob"} <= set(_online(deployment.plane))
    # The SuperNode still running reconnects by itself.
    assert wait_until(lambda: _online(deployment.plane).get("alice") == "online", 60, step_s=1)
