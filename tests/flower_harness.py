"""Real Flower deployments on loopback for the control-plane tests.

A server home with a tiny engine preset, owners with both key pairs, accepted
teachers in the store, owners' local data folders, the Flower plane of
`free-server start` (SuperLink, TLS front, scheduler) in this process, and
`free-client join` SuperNodes as real subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx_builders import tiny_model
from PIL import Image

from free_client.keygen import KeyPaths, generate_keys
from free_common.security.canonical import canonical_bytes
from free_common.security.keys import key_id, load_private_key, load_public_key, public_key_pem
from free_common.security.signing import sign
from free_common.types import ChannelOrder, SubmissionManifest, TaskMetadata
from free_server.commands.clients import _node_public_key
from free_server.flower_plane import FlowerPlane, flower_components
from free_server.home import ServerHome, create_home
from free_server.store import Store
from free_server.superlink import SuperLinkSettings

BIN = Path(sys.executable).parent
# The ServerApp and ClientApp processes inherit this; one thread each keeps 2 cores usable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
TEACHER_TASK = TaskMetadata(5, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))

TINY_PRESET = {
    "base": "smoke",
    "learner": {"arch": "mlp", "width": 16, "channels": 1, "image_size": 16},
    "generator": {"latent_dim": 8, "width": 4, "image_size": 16, "channels": 1},
    "five": {"images_per_class": 2, "augment": {"crop_padding": 1}},
    "scratch": {"steps": 4, "images_per_class": 2, "augment": {"crop_padding": 1}},
    "bell": {
        "maml": {"queries": 1, "inner_steps": 1},
        "replay": {"episode_batch": 1, "patience": 1, "max_batches": 2},
    },
    "memory": {"capacity_per_class": 6},
    "steps": 4,
    "warmup_steps": 1,
    "validation": {"queries": 2, "episodes": 3, "steps": 2},
    "validate_every": 2,
    "checkpoint_every": 2,
    "seed": 7,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


def flower_home(root: Path) -> ServerHome:
    """A server home on loopback with the `tiny` preset."""
    create_home(root)
    text = (root / "config.toml").read_text()
    (root / "config.toml").write_text(text.replace('listen = "0.0.0.0"', 'listen = "127.0.0.1"'))
    (root / "presets").mkdir()
    (root / "presets" / "tiny.json").write_text(json.dumps(TINY_PRESET))
    return ServerHome.open(root)


@dataclass(frozen=True)
class Owner:
    name: str
    keys: KeyPaths

    @property
    def folder(self) -> Path:
        return self.keys.client_key.parent


def add_owner(home: ServerHome, root: Path, name: str, *, enrolled: bool = True) -> Owner:
    """Keygen for an owner; with `enrolled`, its keys go on the allow-list."""
    keys = generate_keys(root / name)
    if enrolled:
        public = load_public_key(keys.client_pub)
        with home.open_store() as store:
            store.add_client(
                name,
                key_id=key_id(public),
                public_key_pem=public_key_pem(public).decode("ascii"),
                node_public_key=_node_public_key(keys.node_pub),
            )
    return Owner(name, keys)


def store_submission(
    store: Store, key: Ed25519PrivateKey, data: bytes, task: TaskMetadata = TEACHER_TASK
) -> int:
    """Store `data` as a submission signed by `key`, as the exchange would; return its id."""
    with store.blob_writer(len(data)) as writer:
        writer.write(data)
        staged = writer.finish()
        manifest = SubmissionManifest(
            client_id=key_id(key.public_key()),
            payload_sha256=staged.sha256,
            payload_size=staged.size,
            task=task,
            created_at_ms=int(time.time() * 1000),
            nonce=secrets.token_bytes(16),
        )
        result = store.record_submission(
            staged,
            client_key_id=manifest.client_id,
            manifest=canonical_bytes(manifest),
            signature=sign(key, manifest).signature,
            nonce=manifest.nonce,
            task_metadata=dataclasses.asdict(task) | {"channel_order": task.channel_order.value},
        )
    return result.row.id


def add_accepted_teachers(home: ServerHome, owner: Owner, seeds: list[int]) -> list[int]:
    """Store one tiny 5-class ONNX teacher per seed, signed by `owner`, and accept it."""
    key = load_private_key(owner.keys.client_key)
    ids = []
    with home.open_store() as store:
        for seed in seeds:
            data = tiny_model(seed, classes=5, task=TEACHER_TASK).SerializeToString()
            ids.append(store_submission(store, key, data))
            store.set_verdict(ids[-1], accepted=True)
    return ids


def owner_data(folder: Path, classes: int = 6, per_class: int = 6, seed: int = 0) -> Path:
    """Class folders of 16x16 grey PNGs: a fixed pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    for index in range(classes):
        pattern = rng.uniform(0, 255, (16, 16))
        where = folder / f"class{index}"
        where.mkdir(parents=True)
        for item in range(per_class):
            noisy = np.clip(pattern + rng.normal(0, 30, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy, mode="L").save(where / f"{item}.png")
    return folder


@contextmanager
def running_plane(
    home: ServerHome, *, reply_timeout_s: float = 20.0, min_models: int = 1000
) -> Iterator[FlowerPlane]:
    """The Flower plane of `free-server start`, in this process, on free loopback ports."""
    with home.open_store() as store:
        plane = flower_components(
            home,
            store,
            flower_port=0,
            min_models=min_models,
            preset="tiny",
            reply_timeout_s=reply_timeout_s,
            poll_s=0.5,
            superlink=SuperLinkSettings(port=free_port(), sync_interval_s=1.0),
        )
        started = []
        try:
            for component in plane.components():
                component.start()
                started.append(component)
            yield plane
        finally:
            for component in reversed(started):
                component.stop(5.0)


def start_join(
    owner: Owner,
    front: str,
    home: ServerHome,
    *,
    data: Path | None = None,
    server_pub: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`free-client join` as a real process (its own process group), output to a log."""
    command = [
        str(BIN / "free-client"),
        "join",
        "--superlink",
        front,
        "--key",
        str(owner.folder),
        "--ca",
        str(home.ca_cert),
        "--server-pub",
        str(server_pub or home.signing_pub),
        "--episodes",
        "3",
        "--shots",
        "1",
    ]
    if data is not None:
        command += ["--data", str(data)]
    log = (owner.folder / "join.log").open("wb")
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
    )


def stop_join(process: subprocess.Popen[bytes], *, kill: bool = False) -> int:
    """Stop a join process group (SIGTERM, or SIGKILL for a crash); return its exit code."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    return process.wait(timeout=30)


def join_log(owner: Owner) -> str:
    return (owner.folder / "join.log").read_text(errors="replace")
