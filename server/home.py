"""The server home: one folder with the config, the TLS material, the signing key and the store.

Layout made by `create_home` (names come from ``[paths]`` in the config)::

    HOME/
      config.toml     settings (`free_server.config`)
      ca.pem          local CA certificate: owners pin it with --ca
      ca.key          CA private key (0600), to issue more certificates
      tls.pem         server certificate: given hosts + localhost, 127.0.0.1, ::1
      tls.key         its private key (0600)
      server.key      Ed25519 key that signs receipts and releases (0600)
      server.pub      its public key: owners pin it with --server-pub
      store/          SQLite rows and content-addressed blobs (`free_server.store`)
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from free_common.errors import HomeError
from free_common.security.keys import (
    generate_signing_key,
    load_private_key,
    write_private_key,
    write_public_key,
)
from free_server.config import CONFIG_NAME, NetworkSettings, ServerConfig, load_config, write_config
from free_server.pki import create_ca, issue_server_certificate, server_alt_names
from free_server.store import Store

__all__ = ["ServerHome", "create_home"]


@dataclass(frozen=True)
class ServerHome:
    """An existing server home and its settings.

    Attributes
    ----------
    root
        The home folder.
    config
        The settings read from its ``config.toml``.
    """

    root: Path
    config: ServerConfig

    @classmethod
    def open(cls, root: Path) -> ServerHome:
        """Open a home made by `create_home`.

        Raises
        ------
        HomeError
            The folder is missing or has no config file.
        ConfigError
            The config file is invalid.
        """
        # Absolute, because the SuperLink runs from HOME/flower and gets paths inside HOME.
        root = root.absolute()
        if not root.is_dir():
            raise HomeError(f"no server home at {root}: run `free-server init --home {root}` first")
        if not (root / CONFIG_NAME).is_file():
            raise HomeError(
                f"{root} is not a server home (no {CONFIG_NAME}): give the folder made by"
                " `free-server init`"
            )
        return cls(root, load_config(root / CONFIG_NAME))

    def _path(self, relative: str) -> Path:
        return self.root / relative  # an absolute setting replaces the root

    @property
    def config_path(self) -> Path:
        """The settings file."""
        return self.root / CONFIG_NAME

    @property
    def store_dir(self) -> Path:
        """The store folder."""
        return self._path(self.config.paths.store)

    @property
    def ca_cert(self) -> Path:
        """The CA certificate owners pin."""
        return self._path(self.config.paths.ca_cert)

    @property
    def ca_key(self) -> Path:
        """The CA private key."""
        return self._path(self.config.paths.ca_key)

    @property
    def tls_cert(self) -> Path:
        """The server's TLS certificate."""
        return self._path(self.config.paths.tls_cert)

    @property
    def tls_key(self) -> Path:
        """The server's TLS private key."""
        return self._path(self.config.paths.tls_key)

    @property
    def signing_key(self) -> Path:
        """The server's Ed25519 private key (signs receipts and releases)."""
        return self._path(self.config.paths.signing_key)

    @property
    def signing_pub(self) -> Path:
        """The server's Ed25519 public key owners pin."""
        return self._path(self.config.paths.signing_pub)

    def open_store(self) -> Store:
        """Open the home's store (it must exist), signing its audit entries with the server key."""
        return Store(self.store_dir, audit_key=load_private_key(self.signing_key))


def create_home(root: Path, hosts: Sequence[str] = ()) -> ServerHome:
    """Make a new server home at `root`: config, CA, TLS certificate, signing key, store.

    `root` may be missing or an empty folder (such as a fresh container volume);
    anything else is refused, so an existing home, its keys and its store are
    never overwritten. On failure, whatever was made is removed again.

    Raises
    ------
    HomeError
        `root` exists and is not an empty folder.
    ConfigError
        A host name is invalid.
    """
    root = root.absolute()
    hosts = tuple(dict.fromkeys(hosts))
    server_alt_names(hosts)  # reject a bad --host before touching the disk
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise HomeError(
            f"{root} already exists and is not empty: init never overwrites a home;"
            " choose a new folder"
        )
    made_root = not root.exists()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = ServerHome(root, ServerConfig(network=NetworkSettings(hosts=hosts)))
        _populate(home, hosts)
    except BaseException:
        _undo(root, made_root)
        raise
    return home


def _populate(home: ServerHome, hosts: Sequence[str]) -> None:
    ca = create_ca()
    ca.write(home.ca_cert, home.ca_key)
    issue_server_certificate(ca, hosts).write(home.tls_cert, home.tls_key)
    signing = generate_signing_key()
    write_private_key(signing, home.signing_key)
    write_public_key(signing.public_key(), home.signing_pub)
    Store(home.store_dir, create=True, audit_key=signing).close()
    # The config goes last: a folder with a config file is a complete home.
    write_config(home.config_path, home.config)


def _undo(root: Path, made_root: bool) -> None:
    if made_root:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
