"""Keep the SuperLink's registered SuperNode keys equal to the allow-list.

The allow-list (`free_server.store`) holds each owner's Flower node key as an
OpenSSH line. With ``--enable-supernode-auth`` the SuperLink admits only
registered keys, so the supervisor calls `sync_node_keys` at start and every
few seconds: keys of active clients that are missing get registered (named
after the client, so rounds can report evaluations by owner name), and every
registered key that is not on the allow-list, revoked owners' and node keys
replaced by `clients rotate --node-pub` included, is unregistered. The
SuperLink compares keys as PEM bytes, as `flwr supernode register` sends them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    RegisterNodeRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from free_server.records import ClientRow

__all__ = ["SyncReport", "allowed_node_keys", "node_key_pem", "sync_node_keys"]

log = logging.getLogger("free_server.node_sync")

_GONE = "unregistered"


@dataclass(frozen=True)
class SyncReport:
    """What one sync changed.

    Attributes
    ----------
    registered
        Names of the clients whose node key was registered now.
    unregistered
        SuperLink node ids whose key was removed now.
    failed
        Client names whose key the SuperLink would not register (logged).
    """

    registered: tuple[str, ...] = ()
    unregistered: tuple[int, ...] = ()
    failed: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether anything was registered, unregistered, or failed."""
        return bool(self.registered or self.unregistered or self.failed)

    def describe(self) -> str:
        """One line for the log."""
        parts = []
        if self.registered:
            parts.append(f"registered {', '.join(self.registered)}")
        if self.unregistered:
            parts.append(f"unregistered node(s) {', '.join(map(str, self.unregistered))}")
        if self.failed:
            parts.append(f"could not register {', '.join(self.failed)}")
        return "; ".join(parts) or "no change"


def node_key_pem(openssh_line: str) -> bytes | None:
    """Return the PEM bytes the SuperLink stores for a node key, or None if unusable."""
    try:
        key = serialization.load_ssh_public_key(openssh_line.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    pem: bytes = public_key_to_bytes(key)
    return pem


def allowed_node_keys(clients: Iterable[ClientRow]) -> dict[bytes, str]:
    """Map the PEM node key of every active client that has one to the client's name."""
    allowed: dict[bytes, str] = {}
    for client in clients:
        if not client.active or client.node_public_key is None:
            continue
        pem = node_key_pem(client.node_public_key)
        if pem is None:
            log.warning("client %s has an unusable node key; it cannot join", client.name)
            continue
        allowed[pem] = client.name
    return allowed


def sync_node_keys(control: ControlHttpClient, clients: Iterable[ClientRow]) -> SyncReport:
    """Register the allow-list's node keys and unregister every other key.

    Raises
    ------
    httpx.HTTPError
        The SuperLink could not be asked (the caller retries later).
    """
    allowed = allowed_node_keys(clients)
    registered: dict[bytes, int] = {}
    for node in control.ListNodes(ListNodesRequest()).nodes_info:
        if node.status != _GONE:
            registered[bytes(node.public_key)] = int(node.node_id)
    removed = []
    for pem, node_id in registered.items():
        if pem not in allowed:
            control.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
            removed.append(node_id)
    added, failed = [], []
    for pem, name in allowed.items():
        if pem in registered:
            continue
        try:
            control.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
        except httpx.HTTPStatusError as exc:
            # E.g. a key registered once and unregistered since: Flower keeps it retired.
            log.warning("the SuperLink refused the node key of %s: %s", name, exc)
            failed.append(name)
            continue
        added.append(name)
    return SyncReport(tuple(added), tuple(removed), tuple(failed))
