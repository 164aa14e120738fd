"""The real commands end to end: `free-server start`, `free-client submit|fetch`, status.

Every process here is the installed console script, talking TLS on loopback. A
refusal must end as one line on stderr with a nonzero exit code, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from exchange_harness import (
    TASK,
    ServerProcess,
    error_lines,
    good_model,
    new_home,
    publish_release,
    release_weights,
    run_cli,
    start_server_process,
    unsupported_op_model,
)
from onnx import TensorProto, helper
from onnx_builders import tiny_model

from free_client.stub import Connection, ExchangeClient
from free_client.task_flags import TaskFlags, resolve_task
from free_client.uploader import sign_manifest
from free_common.errors import ConfigError, MetadataError
from free_common.security.keys import (
    generate_signing_key,
    load_private_key,
    load_public_key,
    write_public_key,
)
from free_common.security.release_dir import MANIFEST_NAME, WEIGHTS_NAME, load_release
from free_common.types import ChannelOrder
from free_server.home import ServerHome


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerHome, ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("cli")
    home = new_home(root / "home")
    server = start_server_process(home)
    try:
        yield home, server, root
    finally:
        code, out, err = server.stop()
        assert code == 0, err[-2000:]
        assert "server stopped" in out


def _owner(root: Path, home: ServerHome, name: str) -> Path:
    """`free-client keygen`, then `free-server clients add`; returns the key folder."""
    keys = root / name
    made = run_cli("free-client", "keygen", "--out", str(keys))
    assert made.returncode == 0, made.stderr
    added = run_cli(
        "free-server", "clients", "add", name, str(keys / "client.pub"), "--home", str(home.root)
    )
    assert added.returncode == 0, added.stderr
    return keys


def _submit(
    server: ServerProcess, home: ServerHome, keys: Path, model: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "free-client", "submit", str(model), "--server", server.address,
        "--key", str(keys / "client.key"), "--ca", str(home.ca_cert), *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_submit_is_accepted_then_status_and_fetch_show_it(
    world: tuple[ServerHome, ServerProcess, Path],
) -> None:
    home, server, root = world
    keys = _owner(root, home, "alice")
    model = root / "alice.onnx"
    model.write_bytes(good_model(seed=20))
    done = _submit(server, home, keys, model, "--server-pub", str(home.signing_pub), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["receipt_verified"] is True
    assert report["verdict"]["state"] == "accepted"
    submission_id = report["submission_id"]
    # Submitting the same file again is an idempotent retry: the same submission.
    again = _submit(server, home, keys, model, "--no-wait")
    assert again.returncode == 0, again.stderr
    assert f"received as submission {submission_id} " in again.stdout
    assert "not waiting" in again.stdout

    shown = run_cli("free-server", "status", "--home", str(home.root), "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["submissions"]["accepted"] >= 1
    mine = [s for s in status["submissions"]["recent"] if str(s["id"]) == submission_id]
    assert mine[0]["client"] == "alice" and mine[0]["state"] == "accepted"
    assert [c["name"] for c in status["clients"]] == ["alice"]
    table = run_cli("free-server", "status", "--home", str(home.root))
    assert table.returncode == 0 and "accepted" in table.stdout

    weights = release_weights()
    publish_release(home, weights)
    out = root / "release"
    fetched = run_cli(
        "free-client", "fetch", "--server", server.address, "--key", str(keys / "client.key"),
        "--ca", str(home.ca_cert), "--server-pub", str(home.signing_pub), "--out", str(out),
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert (out / WEIGHTS_NAME).read_bytes() == weights
    release, _ = load_release(out, load_public_key(home.signing_pub))
    assert release.version == 1

    # A client pinned to another key refuses the release and writes nothing.
    impostor = root / "impostor.pub"
    write_public_key(generate_signing_key().public_key(), impostor)
    refused = run_cli(
        "free-client", "fetch", "--server", server.address, "--key", str(keys / "client.key"),
        "--ca", str(home.ca_cert), "--server-pub", str(impostor), "--out", str(root / "other"),
    )  # fmt: skip
    assert refused.returncode == 4
    assert len(error_lines(refused.stderr)) == 1
    assert "signed by key" in refused.stderr
    assert not (root / "other").exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "code", "text"),
    [
        ("unknown key", 7, "allow-list"),
        ("wrong CA", 4, "TLS handshake"),
        ("unreachable", 7, "cannot reach"),
        ("refused locally", 2, "nothing was sent"),
    ],
)
def test_refusals_end_as_one_line_and_a_nonzero_exit(
    world: tuple[ServerHome, ServerProcess, Path], case: str, code: int, text: str
) -> None:
    home, server, root = world
    folder = root / case.replace(" ", "-")
    folder.mkdir()
    model = folder / "model.onnx"
    model.write_bytes(unsupported_op_model() if case == "refused locally" else good_model(seed=21))
    keys = folder / "keys"
    assert run_cli("free-client", "keygen", "--out", str(keys)).returncode == 0
    args = ["free-client", "submit", str(model), "--key", str(keys / "client.key")]
    if case == "unreachable":
        args += ["--server", "localhost:1", "--ca", str(home.ca_cert), "--retries", "1"]
    elif case == "wrong CA":
        other = new_home(folder / "other-home")
        args += ["--server", server.address, "--ca", str(other.ca_cert)]
    else:
        args += ["--server", server.address, "--ca", str(home.ca_cert)]
    before = _stored(home)
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.stderr
    assert _stored(home) == before


def _stored(home: ServerHome) -> int:
    with home.open_store() as store:
        return sum(store.summary(recent=0).submission_counts.values())


@pytest.mark.slow
def test_sigterm_lets_an_upload_in_flight_finish(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    keys = _owner(tmp_path, home, "bob")
    server = start_server_process(home)
    key = load_private_key(keys / "client.key")
    data = good_model(seed=22)
    signed = sign_manifest(key, data, TASK)

    def slowly() -> Iterator[bytes]:
        for start in range(0, len(data), 200):
            if start == 200:
                server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            yield data[start : start + 200]

    try:
        with ExchangeClient(Connection(server.address, ca=home.ca_cert), key) as c:
            receipt = c.submit(signed, slowly(), timeout_s=30).record
        assert receipt.payload_size == len(data)
    finally:
        # The upload sent SIGTERM already; a second one would mean "quit now".
        code, out, err = server.stop(signal_it=False)
    assert code == 0, err[-2000:]
    assert "server stopped" in out
    assert "received SIGTERM" in err
    with home.open_store() as store:
        assert store.submission(int(receipt.submission_id)).size == len(data)


def test_task_comes_from_the_model_and_flags_win_field_by_field() -> None:
    data = good_model()
    assert resolve_task(data, TaskFlags()) == TASK
    flags = TaskFlags(mean=["0.1"], std=["0.2"], class_names="a, b ,c")
    task = resolve_task(data, flags)
    assert (task.mean, task.std, task.class_names) == ((0.1,), (0.2,), ("a", "b", "c"))
    assert task.input_shape == TASK.input_shape


def test_a_model_without_metadata_needs_flags() -> None:
    bare = tiny_model(task=None).SerializeToString()
    # The graph declares [batch, 1, 8, 8] images and 3 logits: only the normalization is missing.
    with pytest.raises(MetadataError, match="give --mean, --std"):
        resolve_task(bare, TaskFlags())
    declared = resolve_task(bare, TaskFlags(mean=["0.5"], std=["0.25"]))
    assert (declared.num_classes, declared.input_shape) == (3, (1, 8, 8))
    assert declared.channel_order is ChannelOrder.GRAY
    open_graph = tiny_model(task=None)
    open_graph.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    with pytest.raises(MetadataError, match="give --classes, --mean, --std"):
        resolve_task(open_graph.SerializeToString(), TaskFlags())
    flags = TaskFlags(num_classes=3, input_shape="3,8,8", mean=["0.5,0.5", "0.5"], std=["0.25"] * 3)
    task = resolve_task(bare, flags)
    assert task.channel_order is ChannelOrder.RGB
    assert task.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="--mean"):
        resolve_task(bare, dataclasses.replace(flags, mean=["half"]))
    # One value stands for every channel; any other count must match the channels.
    assert resolve_task(bare, dataclasses.replace(flags, std=["0.25"])).std == (0.25,) * 3
    with pytest.raises(MetadataError, match="one value per channel"):
        resolve_task(bare, dataclasses.replace(flags, std=["0.25,0.5"]))
