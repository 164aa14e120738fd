"""A real exchange server on a free loopback port, owners, models and releases for its tests.

`serving` runs the same `ServerRuntime` as `free-server start` (TLS from a fresh
home, intake workers, auth interceptor) inside the test process; `start_server_process`
runs the real command. Models come from `onnx_builders`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import helper
from onnx_builders import TINY_TASK, copy, init, tiny_model

from free_client.stub import Connection, ExchangeClient
from free_common.security.call_auth import now_ms
from free_common.security.canonical import canonical_bytes
from free_common.security.keys import (
    generate_signing_key,
    key_id,
    load_private_key,
    public_key_pem,
    write_private_key,
    write_public_key,
)
from free_common.security.signing import sign
from free_common.types import ReleaseManifest, Signed
from free_server.config import IntakeSettings, LimitSettings
from free_server.home import ServerHome, create_home
from free_server.runtime import ServerRuntime, StartOptions

BIN = Path(sys.executable).parent
CLI_ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}


def new_home(
    root: Path,
    *,
    mutual_tls: bool = False,
    limits: LimitSettings | None = None,
    intake: IntakeSettings | None = None,
) -> ServerHome:
    """A fresh server home listening on loopback, with optional settings changed."""
    home = create_home(root)
    config = home.config
    config = dataclasses.replace(
        config,
        network=dataclasses.replace(config.network, listen="127.0.0.1", mutual_tls=mutual_tls),
        limits=limits or config.limits,
        intake=intake or config.intake,
    )
    text = (root / "config.toml").read_text()
    (root / "config.toml").write_text(text.replace('listen = "0.0.0.0"', 'listen = "127.0.0.1"'))
    return ServerHome(root, config)


@dataclass(frozen=True)
class Owner:
    """A data owner: its signing key and where its key files are."""

    name: str
    key: Ed25519PrivateKey
    key_path: Path
    pub_path: Path

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())


def make_owner(folder: Path, name: str) -> Owner:
    """Keys for an owner, written as client.key / client.pub under `folder/name`."""
    key = generate_signing_key()
    where = folder / name
    where.mkdir(parents=True)
    write_private_key(key, where / "client.key")
    write_public_key(key.public_key(), where / "client.pub")
    return Owner(name, key, where / "client.key", where / "client.pub")


def enroll(home: ServerHome, owner: Owner) -> Owner:
    """Put an owner on the home's allow-list."""
    with home.open_store() as store:
        store.add_client(
            owner.name,
            key_id=owner.key_id,
            public_key_pem=public_key_pem(owner.key.public_key()).decode("ascii"),
        )
    return owner


@contextmanager
def serving(home: ServerHome, *, insecure: bool = False) -> Iterator[ServerRuntime]:
    """Run the server (exchange + intake workers) in this process on a free port."""
    options = StartOptions(port=0, insecure=insecure, grace_s=3.0, flower=False)
    runtime = ServerRuntime(home, options)
    runtime.start()
    try:
        yield runtime
    finally:
        runtime.stop()


def address(runtime: ServerRuntime) -> str:
    assert runtime.exchange is not None
    return f"localhost:{runtime.exchange.port}"


def client(
    runtime: ServerRuntime, owner: Owner, *, ca: Path | None = None, **kwargs: object
) -> ExchangeClient:
    """A client of the running server, trusting its home's CA unless told otherwise."""
    connection = Connection(address(runtime), ca=ca or runtime.home.ca_cert, **kwargs)  # type: ignore[arg-type]
    return ExchangeClient(connection, owner.key, timeout_s=10.0)


@dataclass(frozen=True)
class Stored:
    """What a store holds, to show that a refused upload left nothing behind."""

    submissions: int
    blobs: int
    temp_files: int


def stored(home: ServerHome) -> Stored:
    with home.open_store() as store:
        counts = store.summary(recent=0).submission_counts
        return Stored(
            sum(counts.values()),
            len(store.blobs.all_hashes()),
            len(list(store.blobs.tmp_dir.iterdir())),
        )


def process_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from ``/proc``; None once it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def child_pids(module: str, parent: int | None = None) -> list[int]:
    """Pids of `parent`'s (default: this process's) children running ``python -m <module>``."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = process_stat(int(entry.name))
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat is not None and stat[1] == parent and module.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def intake_worker_pids(parent: int | None = None) -> list[int]:
    """Pids of the full-intake workers running for `parent` (default: this process).

    Each is forked by the parent's intake fork server
    (`free_common.models.intake_forkserver`), which is single-threaded.
    """
    pids = []
    for server in child_pids("free_common.models.intake_forkserver", parent):
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{server}/task/{server}/children").read_text()
            pids.extend(int(pid) for pid in children.split())
    return pids


def wait_until(predicate: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


# --- models ---------------------------------------------------------------------------------


def good_model(seed: int = 0) -> bytes:
    return bytes(tiny_model(seed=seed).SerializeToString())


def padded_model(pad_chars: int) -> bytes:
    """A valid model made bigger by a metadata entry intake ignores."""
    model = copy(tiny_model(seed=1))
    model.metadata_props.add(key="note", value="x" * pad_chars)
    return bytes(model.SerializeToString())


def unsupported_op_model() -> bytes:
    """Refused by the static checks (TopK is not on the allow-list)."""
    model = copy(tiny_model(seed=2))
    model.graph.node[2].op_type = "TopK"
    return bytes(model.SerializeToString())


def infinite_logits_model() -> bytes:
    """Passes the static checks; full intake refuses its NaN/Inf logits."""
    model = copy(tiny_model(seed=3))
    model.graph.node[-1].output[0] = "pre"
    model.graph.initializer.append(init("zero", np.zeros(1, np.float32)))
    model.graph.node.append(helper.make_node("Div", ["pre", "zero"], ["y"]))
    return bytes(model.SerializeToString())


TASK = TINY_TASK


# --- releases -------------------------------------------------------------------------------


def release_weights() -> bytes:
    return bytes(safetensors.numpy.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))


def publish_release(
    home: ServerHome,
    weights: bytes,
    *,
    version: int = 1,
    signer: Ed25519PrivateKey | None = None,
) -> Signed[ReleaseManifest]:
    """Store a signed release the way the engine will: blob, then the signed manifest."""
    key = signer or load_private_key(home.signing_key)
    manifest = ReleaseManifest(
        version=version,
        architecture="conv4",
        config_json='{"preset":"test"}',
        payload_sha256=hashlib.sha256(weights).hexdigest(),
        payload_size=len(weights),
        source_submission_ids=("1",),
        metrics_json='{"accuracy":0.5}',
        created_at_ms=now_ms(),
        server_key_id=key_id(key.public_key()),
    )
    signed = sign(key, manifest)
    with home.open_store() as store, store.blob_writer(1 << 20) as writer:
        writer.write(weights)
        staged = writer.finish()
        store.record_release(
            staged, version=version, manifest=canonical_bytes(manifest), signature=signed.signature
        )
    return signed


# --- the real command -----------------------------------------------------------------------

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    first_line: str

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self, timeout_s: float = 30.0, *, signal_it: bool = True) -> tuple[int, str, str]:
        """SIGTERM (unless already sent), then wait; returns exit code, stdout rest, stderr."""
        if signal_it and self.process.poll() is None:
            self.process.terminate()
        out, err = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, out, err


def start_server_process(home: ServerHome, *extra: str) -> ServerProcess:
    """Run `free-server start --port 0 --no-flower` and wait until it says where it listens."""
    command = ["start", "--home", str(home.root), "--port", "0", "--no-flower", *extra]
    process = subprocess.Popen(
        [str(BIN / "free-server"), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    found = _LISTENING.search(line)
    if found is None:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"free-server start did not come up: {line!r} {err[-2000:]}")
    return ServerProcess(process, int(found.group(2)), line)


def run_cli(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `free-client ...` or `free-server ...` and capture its output."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=timeout_s,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of a CLI's stderr."""
    return [line for line in stderr.splitlines() if line.strip()]
