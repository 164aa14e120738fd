"""`free-client submit`: check a model locally, upload it signed, wait for the server's verdict.

Steps: the task metadata comes from the model's ``metadata_props`` (written by
`free-client export`), with flags winning field by field; local intake runs the
same checks as the server, so a model the server would refuse is never sent;
the upload streams in chunks with a progress bar and retries, with backoff, a
server that is unavailable, busy (its call limit, its full disk) or dropping
TLS handshakes; the receipt is checked (and its signature verified with
``--server-pub``); then the command polls for the verdict unless ``--no-wait``.

Exit status 0 only when the model was accepted (or, with ``--no-wait``,
received). ``--json`` prints::

    {"model": PATH, "submission_id": "7", "receipt": {...}, "receipt_verified": true,
     "verdict": {"state": "accepted"|"refused"|"pending", "reason": "",
                 "decided_at_ms": 1700000000000} | null}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from free_client.options import (
    CaOption,
    InsecureOption,
    KeyOption,
    ServerOption,
    TlsCertOption,
    TlsKeyOption,
    connection,
    pinned_key,
)
from free_client.stub import ExchangeClient
from free_client.uploader import RetryPolicy, upload, wait_for_verdict
from free_common.console import out_console
from free_common.errors import ConfigError, IntakeError, MetadataError
from free_common.models.metadata import read_metadata, task_from_dict, task_to_dict
from free_common.models.onnx_static import IntakeLimits, parse_model
from free_common.security.canonical import canonical_json
from free_common.security.keys import load_private_key
from free_common.types import ChannelOrder, TaskMetadata, Verdict, VerdictState

__all__ = ["TaskFlags", "resolve_task", "submit"]


@dataclass(frozen=True)
class TaskFlags:
    """Task metadata given on the command line; None or empty means "from the model"."""

    num_classes: int | None = None
    input_shape: str | None = None
    channel_order: str | None = None
    mean: Sequence[str] = ()
    std: Sequence[str] = ()
    class_names: str | None = None


def _numbers(flag: str, values: Sequence[str], kind: type[float] | type[int]) -> list[Any]:
    parts = [p.strip() for value in values for p in value.split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, got {values!r}") from None


def resolve_task(data: bytes, flags: TaskFlags) -> TaskMetadata:
    """Return the task metadata of a model: its own ``metadata_props``, overridden by flags.

    Raises
    ------
    NotOnnxError, ModelTooLarge
        The bytes are not an ONNX model this client can read.
    MetadataError
        The model's metadata is malformed, or the result is incomplete or inconsistent.
    ConfigError
        A flag is malformed.
    """
    own = read_metadata(parse_model(data, IntakeLimits()))
    merged: dict[str, Any] = {} if own is None else task_to_dict(own)
    if flags.num_classes is not None:
        merged["num_classes"] = flags.num_classes
    if flags.input_shape is not None:
        merged["input_shape"] = _numbers("--input-shape", [flags.input_shape], int)
    if flags.channel_order is not None:
        merged["channel_order"] = flags.channel_order.lower()
    elif "channel_order" not in merged and len(merged.get("input_shape", [])) == 3:
        # Without a word from the owner, one channel is gray and three are RGB.
        merged["channel_order"] = (
            ChannelOrder.GRAY if merged["input_shape"][0] == 1 else ChannelOrder.RGB
        ).value
    if flags.mean:
        merged["mean"] = _numbers("--mean", flags.mean, float)
    if flags.std:
        merged["std"] = _numbers("--std", flags.std, float)
    if flags.class_names is not None:
        merged["class_names"] = [n.strip() for n in flags.class_names.split(",") if n.strip()]
    missing = [
        flag
        for key, flag in (
            ("num_classes", "--classes"),
            ("input_shape", "--input-shape"),
            ("mean", "--mean"),
            ("std", "--std"),
        )
        if key not in merged
    ]
    if missing:
        raise MetadataError(
            "the model carries no FREE task metadata: export it with `free-client export`,"
            f" or give {', '.join(missing)}"
        )
    return task_from_dict(merged)


def _local_intake(model: Path, data: bytes, task: TaskMetadata) -> None:
    # Intake starts torch and onnxruntime in a worker: import it only when submitting.
    from free_common.models.intake import run_intake

    result = run_intake(data, task=task)
    if not result.accepted:
        raise IntakeError(
            f"{model} is refused by local intake ({result.refusal}): {result.reason};"
            " nothing was sent (`free-client inspect` shows details)"
        )


def _verdict_json(verdict: Verdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {
        "state": verdict.state.value,
        "reason": verdict.reason,
        "decided_at_ms": verdict.decided_at_ms,
    }


def submit(
    model: Annotated[Path, typer.Argument(help="The .onnx file to submit.", show_default=False)],
    server: ServerOption,
    key: KeyOption,
    ca: CaOption = None,
    server_pub: Annotated[
        Path | None,
        typer.Option("--server-pub", help="The aggregator's server.pub: verify the receipt."),
    ] = None,
    classes: Annotated[
        int | None,
        typer.Option("--classes", "--num-classes", help="Number of classes (overrides the model)."),
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="C,H,W of one image (overrides).")
    ] = None,
    channel_order: Annotated[
        str | None, typer.Option("--channel-order", help="gray, rgb or bgr (overrides).")
    ] = None,
    mean: Annotated[
        list[str] | None,
        typer.Option("--mean", help="Per-channel mean, e.g. 0.5 or 0.48,0.45,0.40 (overrides)."),
    ] = None,
    std: Annotated[
        list[str] | None, typer.Option("--std", help="Per-channel std, like --mean (overrides).")
    ] = None,
    class_names: Annotated[
        str | None, typer.Option("--class-names", help="Comma-separated class names (overrides).")
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return at the receipt; do not wait for the verdict.")
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds to wait for the verdict.")
    ] = 600.0,
    retries: Annotated[
        int,
        typer.Option("--retries", help="Upload attempts while the server is unavailable or busy."),
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    insecure: InsecureOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Check MODEL locally, upload it signed, and wait for the server's verdict."""
    target = connection(server, ca, insecure, tls_cert, tls_key)
    signing_key = load_private_key(key)
    pinned = pinned_key(server_pub)
    retry = RetryPolicy(attempts=retries)
    try:
        data = model.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {model}: {exc.strerror or exc}") from None
    flags = TaskFlags(classes, input_shape, channel_order, mean or (), std or (), class_names)
    task = resolve_task(data, flags)
    _local_intake(model, data, task)
    show = out_console.print
    if not as_json:
        show(f"{model}: local intake accepts it", highlight=False, soft_wrap=True)
    with ExchangeClient(target, signing_key) as client:
        signed = upload(
            client,
            signing_key,
            data,
            task,
            label=f"uploading {model.name}",
            server_pub=pinned,
            retry=retry,
        )
        receipt = signed.record
        if not as_json:
            checked = (
                "signature verified" if pinned else "signature NOT verified (give --server-pub)"
            )
            show(
                f"received as submission {receipt.submission_id} ({receipt.payload_size:,} bytes,"
                f" sha256 {receipt.payload_sha256[:16]}...); receipt from server key"
                f" {receipt.server_key_id}, {checked}",
                highlight=False,
                soft_wrap=True,
            )
        verdict = None
        if not no_wait:
            if not as_json:
                show("waiting for the server's intake verdict...", highlight=False)
            verdict = wait_for_verdict(client, receipt.submission_id, timeout_s=wait_timeout)
    if as_json:
        report = {
            "model": str(model),
            "submission_id": receipt.submission_id,
            "receipt": canonical_json(receipt),
            "receipt_verified": pinned is not None,
            "verdict": _verdict_json(verdict),
        }
        typer.echo(json.dumps(report, indent=2))
    if verdict is not None and verdict.state is VerdictState.REFUSED:
        raise IntakeError(
            f"the server refused {model} (submission {receipt.submission_id}): {verdict.reason}"
        )
    if not as_json:
        state = "received (not waiting for the verdict)" if verdict is None else "accepted"
        show(f"{model}: {state}", highlight=False, soft_wrap=True)
