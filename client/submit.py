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
from free_client.task_flags import (
    ChannelOrderOption,
    ClassNamesOption,
    InputShapeOption,
    MeanOption,
    NumClassesOption,
    StdOption,
    TaskFlags,
    resolve_task,
)
from free_client.uploader import RetryPolicy, upload, wait_for_verdict
from free_common.console import out_console
from free_common.errors import ConfigError, IntakeError
from free_common.security.canonical import canonical_json
from free_common.security.keys import load_private_key
from free_common.types import TaskMetadata, Verdict, VerdictState

__all__ = ["submit"]


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
    classes: NumClassesOption = None,
    input_shape: InputShapeOption = None,
    channel_order: ChannelOrderOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    class_names: ClassNamesOption = None,
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
