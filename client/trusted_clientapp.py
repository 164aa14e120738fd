"""The ClientApp executor of a joined SuperNode: runs the installed ClientApp, nothing else.

A stock SuperNode runs, for each message, ``flwr-clientapp``, which unpacks
the run's app bundle (FAB) sent by the aggregator, puts it first on
``sys.path`` and imports its ClientApp: the aggregator's code would run next to
the owner's data. `free-client join` puts a ``flwr-clientapp`` of its own first
on the SuperNode's ``PATH`` that runs `main` here instead, which reuses Flower's
ClientApp process (``flwr.supernode.runtime.run_clientapp``, flwr 1.41) with
two of its steps replaced:

- *installing the bundle* becomes a check that the bundle's sha256 is the one
  of the round app of the installed FREE-Fed version
  (`free_common.flower_app.app_bundle_sha256`); any other bundle is refused
  with `AppBundleRefused`, which the aggregator receives as an error reply.
  The bundle is never unpacked;
- *loading the ClientApp* imports ``free_client.client_app:app`` from the
  installed package, whatever the bundle names.

Run-time dependency installation (``uv sync`` of the bundle's dependencies) is
never done: the flag that asks for it is dropped.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import flwr.supernode.runtime.run_clientapp as clientapp_runtime
from flwr.clientapp import ClientApp
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

from free_common import __version__
from free_common.errors import AppBundleRefused
from free_common.flower_app import APP_NAME, CLIENTAPP_REF, app_bundle_sha256

__all__ = ["check_bundle", "installed_client_app", "main"]

log = logging.getLogger("free_client.trusted_clientapp")

_NO_INSTALL = "--allow-runtime-dependency-installation"


def check_bundle(
    fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
) -> Path:
    """Stand-in for Flower's ``install_from_fab``: accept only the pinned bundle, unpack nothing.

    Raises
    ------
    AppBundleRefused
        The run ships another bundle than the installed round app's.
    """
    del install_dir, skip_prompt  # nothing is installed
    data = fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes()
    got, expected = hashlib.sha256(data).hexdigest(), app_bundle_sha256()
    if got != expected:
        raise AppBundleRefused(
            f"this SuperNode runs only the {APP_NAME} app of FREE-Fed {__version__} (bundle"
            f" sha256 {expected[:16]}...); the run ships bundle {got[:16]}...: refused, nothing"
            " of it was unpacked or run"
        )
    log.info("app bundle %s... is the installed round app", got[:16])
    return Path()


def installed_client_app(
    default_app_ref: str, app_path: str | None, multi_app: bool
) -> Callable[[str, str, str], ClientApp]:
    """Stand-in for Flower's ``get_load_client_app_fn``: always the installed ClientApp."""
    del default_app_ref, app_path, multi_app  # the bundle decides nothing

    def load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
        del fab_id, fab_version, fab_hash
        module_name, attribute = CLIENTAPP_REF.split(":")
        app: ClientApp = getattr(importlib.import_module(module_name), attribute)
        return app

    return load


def main() -> None:
    """Run one ClientApp task the way ``flwr-clientapp`` does, with the two steps replaced."""
    clientapp_runtime.install_from_fab = check_bundle
    clientapp_runtime.get_load_client_app_fn = installed_client_app
    sys.argv = [arg for arg in sys.argv if arg != _NO_INSTALL]
    flwr_clientapp()
