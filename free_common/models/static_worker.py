"""The static checks as a long-lived worker process, so the server never holds a model.

The exchange server acknowledges an upload only after `check_static` passed, but
running it in the server process would hold each model several times over (its
bytes, the parsed protobuf, every weight as an array) for every upload checked
at once: memory that grows with model size times concurrency. Instead the
server keeps a few of these workers (`free_server.static_checks`) and hands each
the path of a staged upload.

Protocol: ``python -m free_common.models.static_worker '<limits JSON>'``, then
one JSON request per line on stdin, ``{"path": str, "task": dict | null}``, and
one JSON reply per line on stdout, ``{"ok": true, "warnings": [...], "dp": {...} | null}`` or
``{"ok": false, "refusal": "<IntakeError subclass>", "reason": str}``. The
worker caps its own address space, file writes and core dumps before it reads
any request; the server enforces the time limit by killing it.

The helpers `limit_process`, `refusal_reply` and `header_for` are shared with the
full intake worker and its caller; this module imports no torch or onnxruntime,
so it starts in a fraction of a second and stays small, and so does a client
that only starts workers.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from free_common.errors import IntakeError, IntakeResourceError
from free_common.lifetime import die_with_parent
from free_common.models.metadata import task_from_dict, task_to_dict
from free_common.models.onnx_static import IntakeLimits, check_static
from free_common.types import TaskMetadata

__all__ = [
    "check_file",
    "header_for",
    "limit_process",
    "main",
    "out_of_memory_reason",
    "refusal_reply",
]


def out_of_memory_reason(memory_bytes: int, detail: str) -> str:
    """Say why a model that exhausted a worker's memory is refused."""
    return (
        f"the model needs more than the intake worker's {memory_bytes:,} bytes of memory "
        f"({detail}); export a smaller model"
    )


def refusal_reply(error: IntakeError) -> dict[str, Any]:
    """Return the JSON reply of a worker that refuses a model."""
    return {"ok": False, "refusal": type(error).__name__, "reason": error.message}


def header_for(task: TaskMetadata | None, limits: IntakeLimits) -> bytes:
    """Encode what the full intake worker reads before the model bytes.

    ``<header length: 8 bytes, big-endian><header JSON>``, the JSON holding the limits
    and the task metadata (`free_common.models.intake_worker.main`).
    """
    header = json.dumps(
        {"limits": asdict(limits), "task": None if task is None else task_to_dict(task)}
    ).encode()
    return len(header).to_bytes(8, "big") + header


def limit_process(memory_bytes: int, cpu_s: int | None) -> None:
    """Cap this process: address space, CPU seconds (None: no cap), no file writes, no core.

    An allocation bomb in an untrusted model then fails in the worker, not in the
    server, and a worker cannot write files even if a parser bug were exploited.
    A worker whose parent is killed outright dies with it.
    """
    die_with_parent()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if cpu_s is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def check_file(
    path: Path, task_data: dict[str, Any] | None, limits: IntakeLimits
) -> dict[str, Any]:
    """Run the static checks on one model file and return the worker's reply."""
    try:
        task = None if task_data is None else task_from_dict(task_data)
        report = check_static(path.read_bytes(), task=task, limits=limits)
    except IntakeError as exc:
        return refusal_reply(exc)
    except MemoryError:
        reason = out_of_memory_reason(limits.memory_bytes, "the static checks could not allocate")
        return refusal_reply(IntakeResourceError(reason))
    dp = None if report.dp is None else {"epsilon": report.dp.epsilon, "delta": report.dp.delta}
    return {"ok": True, "warnings": list(report.warnings), "dp": dp}


def main() -> None:
    """Answer static-check requests on stdin until it closes (see the module docstring)."""
    limits = IntakeLimits(**json.loads(sys.argv[1]))
    limit_process(limits.memory_bytes, cpu_s=None)
    for line in sys.stdin:
        request = json.loads(line)
        reply = check_file(Path(request["path"]), request["task"], limits)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
