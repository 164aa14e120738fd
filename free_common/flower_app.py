"""The Flower app both sides agree on: its bundle, its run settings and the release message.

Every meta round is a Flower run of one app, ``free-fed-round``. Its bundle (FAB)
holds nothing but a ``pyproject.toml`` naming the two entry points,
``free_server.server_app:app`` and ``free_client.client_app:app``, and the run
settings' defaults. Flower's builder is deterministic (fixed zip timestamps,
sorted entries), so an owner builds the same bundle from its installed version
and pins its sha256: a SuperNode started by `free-client join` runs the
installed ClientApp for runs of exactly this bundle and refuses every other
one. Nothing from a bundle is ever unpacked or imported on the owner's side.

The push of a release travels as one message (`release_content`)::

    "release"          ConfigRecord  manifest  = canonical bytes of the ReleaseManifest
                                     signature = the server's Ed25519 signature over them
    "release-weights"  ArrayRecord   weights   = the safetensors file, as a uint8 vector
                                                 (Flower slices it into 5 MiB chunks)

and the owner's reply carries a ``"metrics"`` MetricRecord (`METRIC_KEYS`).

`flower_environment` is the environment every Flower process of ours runs
with: no telemetry, no update check, no run-time dependency installation
(``uv sync`` of a bundle's dependencies), a private ``FLWR_HOME``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.cli.build import build_fab_from_files

from free_common import __version__
from free_common.errors import CanonicalFormError, RecordError, WireError
from free_common.security.canonical import canonical_bytes, record_from_canonical
from free_common.types import MAX_PAYLOAD_BYTES, ReleaseManifest, Signed

__all__ = [
    "APP_NAME",
    "APP_PUBLISHER",
    "CLIENTAPP_REF",
    "METRICS_RECORD",
    "METRIC_KEYS",
    "RELEASE_RECORD",
    "RUN_CONFIG_DEFAULTS",
    "SERVERAPP_REF",
    "WEIGHTS_RECORD",
    "app_bundle",
    "app_bundle_sha256",
    "app_pyproject",
    "flower_environment",
    "read_release_content",
    "release_content",
]

APP_NAME = "free-fed-round"
APP_PUBLISHER = "free-fed"
SERVERAPP_REF = "free_server.server_app:app"
CLIENTAPP_REF = "free_client.client_app:app"

RUN_CONFIG_DEFAULTS: Mapping[str, str | int | float] = {
    "home": "",
    "round-id": 0,
    "preset": "",
    "reply-timeout-s": 600.0,
    "workers": 1,
}
"""Run settings of a meta round; the aggregator overrides them per run, never the bundle."""

RELEASE_RECORD = "release"
WEIGHTS_RECORD = "release-weights"
METRICS_RECORD = "metrics"
METRIC_KEYS = ("version", "stored", "accuracy", "ci95", "episodes")
"""What an owner's reply may report: the release it stored, and its fine-tuning score."""


def _toml_value(value: str | int | float) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def app_pyproject(version: str = __version__) -> bytes:
    """Return the ``pyproject.toml`` of the round app of FREE-Fed `version`."""
    config = "\n".join(f"{key} = {_toml_value(v)}" for key, v in RUN_CONFIG_DEFAULTS.items())
    text = f"""[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "{version}"
description = "One FREE-Fed meta round: push a signed release, collect fine-tuning accuracy"
license = "Apache-2.0"
dependencies = ["free-fed=={version}"]

[tool.flwr.app]
publisher = "{APP_PUBLISHER}"

[tool.flwr.app.components]
serverapp = "{SERVERAPP_REF}"
clientapp = "{CLIENTAPP_REF}"

[tool.flwr.app.config]
{config}
"""
    return text.encode("utf-8")


@functools.cache
def app_bundle(version: str = __version__) -> bytes:
    """Build the round app's bundle (FAB) for FREE-Fed `version`; the same bytes every time."""
    with warnings.catch_warnings():
        # flwr 1.41's builder uses a pathspec pattern type that pathspec deprecates.
        warnings.simplefilter("ignore", DeprecationWarning)
        fab, _ = build_fab_from_files({"pyproject.toml": app_pyproject(version)})
    return bytes(fab)


def app_bundle_sha256(version: str = __version__) -> str:
    """Hex sha256 of `app_bundle` (what an owner's SuperNode pins)."""
    return hashlib.sha256(app_bundle(version)).hexdigest()


def release_content(signed: Signed[ReleaseManifest], weights: bytes) -> RecordDict:
    """Pack a signed release and its weights into a message's content."""
    vector = np.frombuffer(weights, dtype=np.uint8)
    return RecordDict(
        {
            RELEASE_RECORD: ConfigRecord(
                {"manifest": canonical_bytes(signed.record), "signature": signed.signature}
            ),
            WEIGHTS_RECORD: ArrayRecord({"weights": Array(vector)}),
        }
    )


def read_release_content(content: RecordDict) -> tuple[Signed[ReleaseManifest], bytes]:
    """Unpack `release_content`; the signature is *not* checked here.

    Raises
    ------
    WireError
        The content does not hold a well-formed release.
    """
    try:
        release = content.config_records[RELEASE_RECORD]
        array = content.array_records[WEIGHTS_RECORD]["weights"]
    except KeyError:
        raise WireError(
            "the pushed message holds no release (records 'release' and 'release-weights')"
        ) from None
    manifest, signature = release.get("manifest"), release.get("signature")
    if not isinstance(manifest, bytes) or not isinstance(signature, bytes):
        raise WireError("the pushed release's manifest or signature is not bytes")
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise WireError(f"the pushed weights are {array.dtype} {array.shape}, not a byte vector")
    if array.shape[0] > MAX_PAYLOAD_BYTES:
        raise WireError(f"the pushed weights are larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        record = record_from_canonical(manifest, ReleaseManifest)
        signed = Signed(record, signature)
    except (CanonicalFormError, RecordError) as exc:
        raise WireError(f"the pushed release manifest is malformed: {exc.message}") from None
    return signed, array.numpy().tobytes()


def flower_environment(flwr_home: Path, *, path_first: Sequence[Path] = ()) -> dict[str, str]:
    """Return the environment for a Flower process of ours.

    Parameters
    ----------
    flwr_home
        Flower's own folder for that process (installed bundles, state).
    path_first
        Folders to search for commands before the usual ones; the folder of the
        running Python interpreter always comes next, so Flower finds the
        ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` commands
        installed beside it even when that folder is not on ``PATH``.
    """
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    folders = [str(p) for p in path_first] + [str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join([*folders, env.get("PATH", "")])
    return env
