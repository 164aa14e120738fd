"""Publish a meta round's result as a versioned release, signed with the server key.

A release is the safetensors blob plus a `ReleaseManifest` whose canonical
bytes the server's Ed25519 key signs. The blob is placed and the manifest row
committed in one store transaction (`Store.record_release`), so a release that
is listed always has its weights. The manifest's fields:

- ``architecture``: the meta-learner's backbone name (``conv4``, ...);
- ``config_json``: what an owner needs to rebuild and fine-tune the model:
  ``{"format", "architecture": {"arch", "width", "ways", "channels",
  "image_size"}, "input", "method", "preset", "fresh", "round", "steps",
  "selected_step", "selection", "seed", "device", "skipped_teachers",
  "engine": <the engine configuration>}``;
- ``metrics_json``: the round's own figures (meta-val accuracy when the server
  had meta-val episodes, teacher accuracy on recovered images, recovery time);
  and ``dp``: how many of its teachers declare DP-SGD training and the smallest and
  largest epsilon (and largest delta) among those (`dp_summary`);
- ``source_submission_ids``: the accepted submissions it was learned from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from free_common.security.canonical import canonical_bytes
from free_common.security.keys import key_id
from free_common.security.signing import sign
from free_common.types import DpGuarantee, ReleaseManifest, Signed
from free_server.records import ReleaseRow
from free_server.rounds import MetaRoundOutput
from free_server.store import Store

__all__ = ["dp_summary", "publish_release", "release_manifest"]

_CONFIG_KEYS = (
    "format",
    "architecture",
    "input",
    "method",
    "round",
    "steps",
    "selected_step",
    "selection",
    "seed",
    "device",
    "skipped_teachers",
    "new_teacher_ids",
    "seen_teacher_ids",
)


def _finite(value: Any) -> Any:
    """Replace NaN and infinities (which JSON cannot hold) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(_finite(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def dp_summary(declared: Sequence[DpGuarantee | None]) -> dict[str, Any]:
    """Return a release's ``metrics.dp`` from its teachers' declared DP guarantees.

    The release is computed from every teacher, and one owner's data reaches it only
    through that owner's model: for that owner the release is as private as its own
    model (post-processing), whatever the others declared. So the range is reported,
    not a single guarantee.
    """
    private = [d for d in declared if d is not None]
    return {
        "teachers": len(declared),
        "teachers_with_dp": len(private),
        "epsilon_min": min((d.epsilon for d in private), default=None),
        "epsilon_max": max((d.epsilon for d in private), default=None),
        "delta_max": max((d.delta for d in private), default=None),
    }


def release_manifest(
    output: MetaRoundOutput,
    *,
    version: int,
    server_key: Ed25519PrivateKey,
    dp: Sequence[DpGuarantee | None] = (),
) -> ReleaseManifest:
    """Describe a round's output as release `version` (not signed yet).

    `dp` holds the DP guarantee each source submission declares, in `source_ids` order.
    """
    engine_manifest = output.initialization.manifest
    config = {key: engine_manifest[key] for key in _CONFIG_KEYS if key in engine_manifest}
    config.update(preset=output.preset, fresh=output.fresh, engine=engine_manifest.get("config"))
    return ReleaseManifest(
        version=version,
        architecture=str(engine_manifest["architecture"]["arch"]),
        config_json=_json(config),
        payload_sha256=output.initialization.sha256,
        payload_size=len(output.initialization.data),
        source_submission_ids=output.source_ids,
        metrics_json=_json({**engine_manifest.get("metrics", {}), "dp": dp_summary(dp)}),
        created_at_ms=int(time.time() * 1000),
        server_key_id=key_id(server_key.public_key()),
    )


def publish_release(
    store: Store, output: MetaRoundOutput, server_key: Ed25519PrivateKey, *, round_id: int
) -> tuple[ReleaseRow, Signed[ReleaseManifest]]:
    """Sign a round's output and record it in the store as the next release version.

    Returns
    -------
    tuple
        The stored release row and the signed manifest (what owners verify).
    """
    version = store.next_release_version()
    declared = [store.submission(int(source)).dp for source in output.source_ids]
    manifest = release_manifest(output, version=version, server_key=server_key, dp=declared)
    signed = sign(server_key, manifest)
    data = output.initialization.data
    with store.blob_writer(len(data)) as writer:
        writer.write(data)
        staged = writer.finish()
        row = store.record_release(
            staged,
            version=version,
            manifest=canonical_bytes(signed.record),
            signature=signed.signature,
            round_id=round_id,
        )
    return row, signed
