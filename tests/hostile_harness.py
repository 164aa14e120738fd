"""What the hostile-input tests need around the real exchange server.

- `Sandbox`: the server's working directory and home with canary files in them (a
  plain file, a hard link to a secret outside, a secret in the home), each watched
  with inotify (`onnx_builders.OpenWatch`, which sees opens and reads by any process,
  C++ libraries included), and a listing of both trees (size, mtime, sha256) so a new
  or changed file outside ``store/`` is seen;
- `StoreView`: the store's rows, blobs and temporary files, to show that a refused
  input left nothing behind;
- `raw_call`: any bytes to any exchange method over a plain gRPC channel (identity
  serializers), with the caller's signed call metadata, so malformed protobuf reaches
  the server's decoder instead of being refused by a stub;
- `honest_upload`: the next honest owner's upload, checked against the pinned key;
- `varint`, `length_delimited`: protobuf written by hand, for what the generated
  classes and onnx.helper refuse to build (fields of the wrong wire type, nesting
  past protobuf's depth limit, strings that are not UTF-8).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from exchange_harness import TASK, Owner, address, client, good_model
from onnx_builders import OpenWatch

from free_client.uploader import upload
from free_common.security.call_auth import sign_call
from free_common.security.keys import load_public_key
from free_common.types import Receipt, Signed
from free_server.home import ServerHome
from free_server.runtime import ServerRuntime

SECRET = b"owner-private-bytes " * 64
"""What the canaries hold: 1280 bytes, a whole number of float32 values."""

Tree = dict[str, tuple[int, int, str]]


def _tree(root: Path, skip: str | None = None) -> Tree:
    """Every file under `root` (but `skip`): relative path -> (size, mtime_ns, sha256)."""
    found: Tree = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if skip is not None and relative.parts[:1] == (skip,):
            continue
        if path.is_file():
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(relative)] = (info.st_size, info.st_mtime_ns, digest)
    return found


@dataclass
class Sandbox:
    """Canary files around a server, and the means to show nobody touched them.

    Attributes
    ----------
    cwd
        The server process's working directory, holding ``canary.bin`` and
        ``weights.bin`` (a hard link to `secret`).
    home
        The server home, holding ``canary.bin``.
    secret
        A file outside both, in a folder of its own.
    """

    cwd: Path
    home: Path
    secret: Path

    @classmethod
    def create(cls, root: Path, home: ServerHome) -> Sandbox:
        """Put canaries in `root/cwd`, the home and `root/outside`."""
        cwd, outside = root / "cwd", root / "outside"
        cwd.mkdir()
        outside.mkdir()
        secret = outside / "secret.bin"
        secret.write_bytes(SECRET)
        (cwd / "canary.bin").write_bytes(SECRET)
        os.link(secret, cwd / "weights.bin")
        (home.root / "canary.bin").write_bytes(SECRET)
        return cls(cwd, home.root, secret)

    @property
    def canaries(self) -> tuple[Path, ...]:
        """The watched files (the hard link shares the secret's inode and its watch)."""
        return (self.cwd / "canary.bin", self.home / "canary.bin", self.secret)

    def listing(self) -> tuple[Tree, Tree]:
        """The working directory's files and the home's files outside ``store/``."""
        return _tree(self.cwd), _tree(self.home, skip="store")

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Fail if the block opens or reads a canary, or adds or changes a file outside the store.

        Read the listing before the watches start: listing reads every file.
        """
        before = self.listing()
        watches = [OpenWatch(path) for path in self.canaries]
        try:
            yield
            touched = {str(p): w.events() for p, w in zip(self.canaries, watches, strict=True)}
        finally:
            for watch in watches:
                watch.close()
        assert not any(touched.values()), f"a canary was opened or read: {touched}"
        assert self.listing() == before, "a file outside the store appeared or changed"


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block (and a server started in it) with `path` as working directory."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@dataclass(frozen=True)
class StoreView:
    """The store's content, to compare before and after a refused input."""

    submission_ids: tuple[int, ...]
    blobs: frozenset[str]
    temp_files: tuple[str, ...]


def store_view(home: ServerHome) -> StoreView:
    """Read the rows, blobs and temporary files of the home's store."""
    with home.open_store() as store:
        ids = tuple(row.id for row in store.summary(recent=1_000_000).submissions)
        return StoreView(
            ids,
            frozenset(store.blobs.all_hashes()),
            tuple(sorted(p.name for p in store.blobs.tmp_dir.iterdir())),
        )


def raw_channel(runtime: ServerRuntime, *, send_cap: bool = True) -> grpc.Channel:
    """A TLS channel to the server with no message caps of its own on receive.

    With ``send_cap=False`` it sends messages of any size, so the server's own
    receive cap is what refuses them.
    """
    options = [("grpc.max_receive_message_length", -1)]
    if not send_cap:
        options.append(("grpc.max_send_message_length", -1))
    credentials = grpc.ssl_channel_credentials(runtime.home.ca_cert.read_bytes())
    return grpc.secure_channel(address(runtime), credentials, options=options)


Metadata = Sequence[tuple[str, str | bytes]]


def _identity(data: bytes) -> bytes:
    return data


def raw_call(
    channel: grpc.Channel,
    method: str,
    payload: bytes | Sequence[bytes],
    *,
    owner: Owner | None = None,
    metadata: Metadata | None = None,
) -> tuple[str, str]:
    """Send raw bytes to ``/free.v1.Exchange/<method>``; return (status name, details).

    Parameters
    ----------
    channel
        From `raw_channel`.
    method
        ``Submit`` (a stream: `payload` is a sequence of messages), ``GetVerdict``,
        ``GetStatus`` or ``FetchRelease`` (one message).
    owner
        Signs the call metadata for this method, unless `metadata` is given.
    metadata
        Exactly the metadata to send.
    """
    full = f"/free.v1.Exchange/{method}"
    if metadata is None:
        metadata = sign_call(owner.key, full) if owner is not None else ()
    entries = tuple(metadata)
    kwargs = {"request_serializer": _identity, "response_deserializer": _identity}
    try:
        if method == "Submit":
            assert not isinstance(payload, bytes)
            channel.stream_unary(full, **kwargs)(iter(payload), timeout=30, metadata=entries)
        elif method == "FetchRelease":
            assert isinstance(payload, bytes)
            list(channel.unary_stream(full, **kwargs)(payload, timeout=30, metadata=entries))
        else:
            assert isinstance(payload, bytes)
            channel.unary_unary(full, **kwargs)(payload, timeout=30, metadata=entries)
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


def honest_upload(runtime: ServerRuntime, owner: Owner, seed: int = 0) -> Signed[Receipt]:
    """An honest owner's upload; its receipt must verify with the pinned server key."""
    with client(runtime, owner) as connection:
        return upload(
            connection,
            owner.key,
            good_model(seed),
            TASK,
            server_pub=load_public_key(runtime.home.signing_pub),
            notify=lambda _line: None,
        )


def wait_for_no_temp_files(home: ServerHome, timeout_s: float = 10.0) -> None:
    """Wait until the store holds no temporary upload file (an aborted upload closing)."""
    tmp = home.root / home.config.paths.store / "tmp"
    deadline = time.monotonic() + timeout_s
    while any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Protobuf field `number` of wire type 2 (bytes, string or message) holding `payload`."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
