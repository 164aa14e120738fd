"""The console over real TLS in this process: tokens, /metrics, the manifest, no write path.

The home holds a finished round run by the server's own round code (`console_harness`),
so the figures checked here are the store's and the engine's, not made up.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from console_harness import REFUSAL, FinishedRound, console_token, finished_round_home
from exchange_harness import run_cli, start_server_process
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from free_common.errors import ConfigError, StoreError
from free_common.security.canonical import record_from_canonical
from free_common.security.keys import load_public_key
from free_common.security.signing import verify
from free_common.types import ReleaseManifest, Signed
from free_server.console.app import ConsoleServer
from free_server.console.auth import TOKENS_NAME, withdraw_tokens
from free_server.console.pages import _shown_state
from free_server.fleet_front import NodesSeen
from free_server.round_journal import JOURNAL_NAME, read_journal, round_dir
from free_server.server_app import TENSORBOARD_DIR
from free_server.store import Store

ROUTES = [
    "/",
    "/owners",
    "/submissions",
    "/submissions?state=refused",
    "/rounds",
    "/rounds/1",
    "/rounds/2",
    "/rounds/3",
    "/rounds/2/recovered/1.png",
    "/releases",
    "/releases/1/manifest.json",
    "/releases/2/manifest.json",
    "/metrics",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> FinishedRound:
    return finished_round_home(tmp_path_factory.mktemp("console"))


@pytest.fixture(scope="module")
def console(finished: FinishedRound) -> Iterator[ConsoleServer]:
    server = ConsoleServer(finished.home, 0)
    server.start()
    yield server
    server.stop(2.0)


@pytest.fixture(scope="module")
def token(finished: FinishedRound) -> str:
    return console_token(finished.home)


def _trust(console: ConsoleServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(console.home.ca_cert))


def _get(console: ConsoleServer, path: str, token: str | None) -> httpx.Response:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.get(console.url.rstrip("/") + path, headers=headers, verify=_trust(console))


@pytest.mark.parametrize("path", [*ROUTES, "/no-such-page", "/docs", "/openapi.json"])
def test_every_path_needs_a_token(console: ConsoleServer, path: str) -> None:
    for authorization in (None, "Bearer not-a-token", "Basic " + base64.b64encode(b"x:y").decode()):
        headers = {} if authorization is None else {"authorization": authorization}
        reply = httpx.get(console.url.rstrip("/") + path, headers=headers, verify=_trust(console))
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"].startswith("Basic")
        assert "free-server console token" in reply.text


@pytest.mark.parametrize("path", ROUTES)
def test_every_page_answers_with_a_token(console: ConsoleServer, token: str, path: str) -> None:
    reply = _get(console, path, token)
    assert reply.status_code == 200
    assert reply.headers["cache-control"] == "no-store"


def test_a_browser_can_send_the_token_as_the_basic_password(
    console: ConsoleServer, token: str
) -> None:
    reply = httpx.get(console.url, auth=("operator", token), verify=_trust(console))
    assert reply.status_code == 200 and "Overview" in reply.text


def test_tokens_are_kept_hashed_and_withdrawn_at_once(
    finished: FinishedRound, console: ConsoleServer
) -> None:
    kept = (finished.home.root / TOKENS_NAME).read_bytes()
    mine = console_token(finished.home)
    stored = (finished.home.root / TOKENS_NAME).read_text()
    assert mine not in stored
    assert hashlib.sha256(mine.encode()).hexdigest() in stored
    assert (finished.home.root / TOKENS_NAME).stat().st_mode & 0o077 == 0
    assert _get(console, "/", mine).status_code == 200
    assert withdraw_tokens(finished.home.root) >= 1
    assert _get(console, "/", mine).status_code == 401
    (finished.home.root / TOKENS_NAME).write_bytes(kept)  # the other tests' tokens


def test_the_console_is_tls_with_the_homes_certificate(console: ConsoleServer) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(console.url)  # the system's roots do not know the home's CA
    plain = console.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(plain)


def test_metrics_parse_with_prometheus_own_parser(
    finished: FinishedRound, console: ConsoleServer
) -> None:
    token = console_token(finished.home)
    text = _get(console, "/metrics", token).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("free_submissions_received_total", ())] == 4
    assert samples[("free_submissions_accepted_total", ())] == 3
    reason = (("reason", "operator Loop is not on the intake allow-list"),)
    assert samples[("free_submissions_refused_total", reason)] == 1
    assert samples[("free_submissions_pending", ())] == 0
    assert samples[("free_submissions_held", ())] == 0
    assert samples[("free_screening_seconds_count", ())] == 0  # this home does not screen
    assert ("free_supernodes_connected", ()) not in samples  # nor runs Flower
    with finished.home.open_store() as store:
        sizes = [store.submission(i).size for i in [*finished.accepted, finished.refused]]
        done = [store.round(i) for i in (finished.first_round_id, finished.round_id)]
    assert samples[("free_upload_bytes_total", ())] == sum(sizes)
    assert samples[("free_intake_latency_seconds_count", ())] == 4
    assert samples[("free_intake_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("free_rounds", (("state", "finished"),))] == 2
    assert samples[("free_rounds", (("state", "running"),))] == 1
    duration = sum((r.finished_at - r.started_at).total_seconds() for r in done)  # type: ignore[operator]
    assert samples[("free_round_duration_seconds_count", ())] == 2
    assert samples[("free_round_duration_seconds_sum", ())] == pytest.approx(duration)
    running = (("round", str(finished.running_id)),)
    assert samples[("free_round_step", running)] == 2
    assert samples[("free_round_steps", running)] == 4
    assert samples[("free_releases_total", ())] == 2
    assert samples[("free_release_latest_version", ())] == 2
    assert samples[("free_owners", (("state", "active"),))] == 2
    store_size = sum(p.stat().st_size for p in finished.home.store_dir.rglob("*") if p.is_file())
    assert samples[("free_store_bytes", ())] == store_size


def test_the_manifest_download_verifies_against_the_server_key(
    finished: FinishedRound, console: ConsoleServer, token: str
) -> None:
    reply = _get(console, f"/releases/{finished.release_version}/manifest.json", token)
    assert "attachment" in reply.headers["content-disposition"]
    document = json.loads(reply.content)
    assert document["format"] == "free-fed-release/1"
    with finished.home.open_store() as store:
        row = store.release(finished.release_version)
    record = record_from_canonical(row.manifest, ReleaseManifest)
    signed = Signed(record, bytes.fromhex(document["signature"]))
    assert verify(load_public_key(finished.home.signing_pub), signed) == record
    assert document["manifest"]["payload_sha256"] == row.sha256
    assert _get(console, "/releases/9/manifest.json", token).status_code == 404


def test_pages_show_the_stores_figures(
    finished: FinishedRound, console: ConsoleServer, token: str
) -> None:
    submissions = _get(console, "/submissions?state=refused", token).text
    assert REFUSAL in submissions and submissions.count("<tr>") == 2  # header + the refusal
    round_page = _get(console, f"/rounds/{finished.round_id}", token).text
    with finished.home.open_store() as store:
        release = store.release(finished.release_version)
    metrics = json.loads(record_from_canonical(release.manifest, ReleaseManifest).metrics_json)
    assert f"{metrics['recovery_seconds_per_teacher']:.1f} s" in round_page
    assert f"{100 * metrics['teacher_accuracy']:.1f}%" in round_page
    assert round_page.count('class="grid"') == 3  # one grid per model, show_recovered on
    earlier = _get(console, f"/rounds/{finished.first_round_id}", token).text
    assert 'class="grid"' not in earlier and "holds a later round" in earlier
    assert _get(console, "/rounds/1/recovered/1.png", token).status_code == 404
    releases = _get(console, "/releases", token).text
    assert releases.count("signed manifest</a>") == 2
    running = _get(console, f"/rounds/{finished.running_id}", token).text
    assert "2 / 4" in running and '<svg class="curve"' in running and "62.5%" in running


def test_recovered_images_stay_hidden_unless_switched_on(
    tmp_path: Path, finished: FinishedRound
) -> None:
    hidden = finished_round_home(tmp_path, show_recovered=False)
    token = console_token(hidden.home)
    server = ConsoleServer(hidden.home, 0)
    server.start()
    try:
        page = _get(server, f"/rounds/{hidden.round_id}", token).text
        assert "show_recovered = false" in page and 'class="grid"' not in page
        assert _get(server, f"/rounds/{hidden.round_id}/recovered/1.png", token).status_code == 404
    finally:
        server.stop(2.0)


def _store_files(store_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store_dir.rglob("*"))
        if p.is_file()
    }


def test_serving_every_page_writes_nothing(finished: FinishedRound, console: ConsoleServer) -> None:
    token = console_token(finished.home)
    before = _store_files(finished.home.store_dir)
    for path in ROUTES:
        assert _get(console, path, token).status_code == 200
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            reply = httpx.request(
                method,
                console.url.rstrip("/") + path.split("?")[0],
                headers={"authorization": f"Bearer {token}"},
                verify=_trust(console),
            )
            assert reply.status_code in (404, 405)
    assert _store_files(finished.home.store_dir) == before


def test_the_read_only_store_refuses_every_write(finished: FinishedRound) -> None:
    with Store(finished.home.store_dir, read_only=True) as store:
        assert store.summary().submission_counts["accepted"] == 3
        for write in (
            lambda: store.request_round("tiny"),
            lambda: store.add_client("eve", key_id="e" * 32, public_key_pem="x"),
            lambda: store.set_verdict(finished.refused, accepted=True),
            lambda: store.prune_nonces(before=store.round(1).requested_at),
        ):
            with pytest.raises(StoreError, match="read-only"):
                write()
        # Beneath the store's own refusal, SQLite refuses writes on the connection too.
        for statement in ("UPDATE rounds SET preset = 'x'", "DELETE FROM nonces"):
            with pytest.raises(sqlite3.OperationalError, match=r"readonly|query_only"):
                store._conn.execute(statement)
    with pytest.raises(StoreError, match="no store"):
        Store(finished.home.root / "nowhere", read_only=True)


_WRITES = {
    "add_client",
    "rotate_client",
    "revoke_client",
    "record_submission",
    "set_verdict",
    "request_round",
    "start_round",
    "finish_round",
    "record_release",
    "record_evaluation",
    "prune_nonces",
    "recover",
    "blob_writer",
    "open_store",
}


def test_no_console_module_calls_a_write_method() -> None:
    root = Path(__file__).resolve().parent.parent / "server" / "console"
    called = {
        node.func.attr
        for path in root.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not called & _WRITES
    assert "read_only" in (root / "app.py").read_text()


def test_the_round_journal_and_tensorboard_files_hold_the_round(finished: FinishedRound) -> None:
    folder = round_dir(finished.home.root, finished.round_id)
    progress = read_journal(folder / JOURNAL_NAME)
    assert progress is not None
    assert (progress.stage, progress.step, progress.steps) == ("finished", 4, 4)
    assert [s for s, _ in progress.recovery_seconds] == [1, 2, 3, 4]
    assert progress.checkpoint_step == 4
    board = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"images": 0})
    board.Reload()
    tags = board.Tags()
    lines = [json.loads(x) for x in (folder / JOURNAL_NAME).read_text().splitlines()]
    replayed = any(x.get("replay_loss") is not None for x in lines)
    # MAML replay starts once the memory holds a whole task; a 4-step round may end first.
    assert ("train/replay_loss" in tags["scalars"]) == replayed
    for tag in (
        "train/distill_loss",
        "train/iga_alignment",
        "recovery/seconds",
        "recovery/teacher_accuracy",
        "recovery/generator_loss",
    ):
        assert tag in tags["scalars"], tag
    accuracy = [(e.step, e.value) for e in board.Scalars("recovery/teacher_accuracy")]
    assert accuracy == [(s, pytest.approx(v, abs=1e-6)) for s, v in progress.teacher_accuracy]
    assert {f"recovered/{i}" for i in finished.accepted} <= set(tags["images"])
    image = board.Images(f"recovered/{finished.accepted[0]}")[-1]
    assert image.width > 0 and image.encoded_image_string.startswith(b"\x89PNG")


def test_console_token_command_prints_one_token(finished: FinishedRound) -> None:
    made = run_cli("free-server", "console", "token", "--home", str(finished.home.root))
    assert made.returncode == 0, made.stderr
    (line,) = made.stdout.split()
    assert (
        hashlib.sha256(line.encode()).hexdigest() in (finished.home.root / TOKENS_NAME).read_text()
    )
    missing = run_cli("free-server", "console", "token", "--home", "/nonexistent/home")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "free-server init" in missing.stderr


def test_a_taken_console_port_is_one_clear_line(
    finished: FinishedRound, console: ConsoleServer
) -> None:
    second = ConsoleServer(finished.home, console.port)
    with pytest.raises(ConfigError, match="--console-port"):
        second.start()


def test_free_server_start_serves_the_console_until_stopped(finished: FinishedRound) -> None:
    token = console_token(finished.home)
    server = start_server_process(finished.home, "--console-port", "0")
    try:
        line = server.process.stdout.readline()  # type: ignore[union-attr]
        while "console on" not in line:
            line = server.process.stdout.readline()  # type: ignore[union-attr]
        url = line.split("console on ", 1)[1].split(" ", 1)[0]
        assert url.startswith("https://127.0.0.1:")  # loopback unless told otherwise
        trust = ssl.create_default_context(cafile=str(finished.home.ca_cert))
        reply = httpx.get(
            url + "metrics", headers={"authorization": f"Bearer {token}"}, verify=trust
        )
        assert reply.status_code == 200 and "free_releases_total 2.0" in reply.text
    finally:
        code, out, _ = server.stop()
    assert code == 0 and "server stopped" in out


def test_a_console_port_out_of_range_is_one_clear_line(finished: FinishedRound) -> None:
    done = run_cli(
        "free-server", "start", "--home", str(finished.home.root), "--console-port", "70000"
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --console-port 70000 is not a TCP port"


def test_nodes_seen_counts_each_key_within_the_window() -> None:
    now = [100.0]
    nodes = NodesSeen(clock=lambda: now[0])
    nodes.saw("a")
    nodes.saw("b")
    now[0] = 150.0
    nodes.saw("a")
    assert nodes.count(60) == 2 and nodes.count(30) == 1
    now[0] = 500.0
    assert nodes.count(60) == 0


def test_the_submissions_page_files_rows_as_status_counts_them() -> None:
    row = {"state": "received", "withdrawn_at": None, "held_at": None}
    assert _shown_state(row) == "received"
    assert _shown_state(row | {"held_at": "2030-01-01T00:00:00+00:00"}) == "held"
    withdrawn = row | {"held_at": "2030", "withdrawn_at": "2030"}
    assert _shown_state(withdrawn) == "withdrawn"
