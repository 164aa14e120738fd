"""Load benchmark of the exchange service: K owners submit models of one size at once, over TLS.

It makes a server home in a temporary folder (loopback only), enrolls K owners,
starts ``free-server start --no-flower`` as a subprocess, and has the K owners,
spread over ``--procs`` generator processes, upload a distinct valid ONNX model of
the chosen size at the same moment, each over its own TLS channel (the uploader's
own building blocks: signed manifest, chunked stream, receipt checked against
the pinned server key). Each owner is a task on grpc's asyncio client, one event
loop per process (``--owners asyncio``, the default), or a thread with its own
`ExchangeClient` (``--owners threads``), whose blocking waits cost the generator
about three times the CPU. It reports, as JSON on stdout and in ``--out``:

- ``acknowledged``: uploads that got a verified receipt; ``stored_once``: owners
  with exactly one stored row whose blob's sha256 is their model's;
- ``throughput_per_s``, ``throughput_mb_per_s``, ``p50_s``, ``p99_s``: receipts
  per second and MiB per second into the store, and latency from the common
  start to the receipt (retries included);
- ``busy_retries``: calls refused with RESOURCE_EXHAUSTED because the server's
  hard cap on calls (`free_server.grpc_server.MAX_CONCURRENT_CALLS`) was reached;
  ``unavailable_retries`` and ``handshake_retries`` count connections that timed
  out or whose TLS handshake the loaded server dropped. The benchmark retries all
  three with jittered backoff, as ``free-client submit`` does
  (`free_client.uploader`), and counts them by kind;
- ``verdict_s``: time from the start until every acknowledged model has its
  intake verdict, and the verdict counts; ``verdict_s_per_model`` and
  ``intake_cpu_s_per_model`` (CPU of the intake worker processes per verdict);
- ``cpu_s_until_receipts``: CPU seconds from the start to the last receipt of the
  exchange process (and its threads by name), its static check workers, intake
  workers, and the load generator's processes (`load_profile`);
- ``server_rss_growth_mb``: peak RSS of the exchange server process during the
  run (its ``VmHWM``, reset with ``/proc/PID/clear_refs`` once the server is idle)
  minus its idle RSS. Intake workers and static check workers are separate
  processes under their own memory limit (``intake.memory_mb``); their largest
  sampled peaks are reported apart;
- with ``--profile DIR``: a perf recording of the exchange process (on-CPU split
  by shared object) and a py-spy profile of its Python (``--gil``), summarized;
- with ``--wait-profile DIR`` instead: a py-spy profile of every exchange thread,
  idle ones included, until the last receipt, summarized per group of threads as
  ``thread_states_until_receipts`` (where upload threads wait, and for what).

Usage::

    .venv/bin/python benchmarks/load.py --clients 200 --model-mb 5 \\
        --out benchmarks/results/load-200x5mb.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from load_profile import (
    cpu_seconds,
    perf_split,
    profile_split,
    start_perf,
    start_profiler,
    start_wait_profiler,
    stop_profiler,
    thread_cpu,
    thread_states,
    top_frames,
)
from onnx import TensorProto, helper, numpy_helper

from free_client.stub import (
    CHANNEL_OPTIONS,
    Connection,
    ExchangeClient,
    channel_credentials,
    method_path,
)
from free_client.uploader import check_receipt, sign_manifest
from free_common import wire
from free_common.errors import FreeError, ServerRefused, ServerUnavailable, TlsError
from free_common.models.metadata import write_metadata
from free_common.proto import exchange_pb2 as pb
from free_common.security.call_auth import sign_call
from free_common.security.keys import generate_signing_key, key_id, load_public_key, public_key_pem
from free_common.types import ChannelOrder, TaskMetadata
from free_server.config import CONFIG_NAME, write_config
from free_server.home import ServerHome, create_home

TASK = TaskMetadata(3, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))
BUSY = "Concurrent RPC limit"
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_MB = 1024 * 1024


# --- models ---------------------------------------------------------------------------------


def template_model(size: int) -> bytes:
    """A valid teacher of about `size` bytes: Flatten, a wide Gemm, Relu, Gemm (3 classes).

    The weight of the first Gemm carries the size, so the model stays under the
    intake caps on any one tensor (2**24 values, about 64 MiB) and in total.
    """
    hidden = max(1, size // (4 * (64 + 3 + 1)))
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(
            (rng.standard_normal((hidden, 64)) * 0.05).astype(np.float32), "w1"
        ),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((3, hidden)) * 0.05).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "load",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    write_metadata(model, TASK)
    return bytes(model.SerializeToString())


def _field(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field (short payloads only)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def owner_model(template: bytes, index: int) -> bytes:
    """The template plus one metadata entry naming the owner, so every model is distinct.

    Appending a serialized field to a message merges it: this adds one
    ``metadata_props`` entry (ModelProto field 14) without re-encoding the weights.
    """
    entry = _field(1, b"bench.owner") + _field(2, str(index).encode())
    return template + _field(14, entry)


# --- the server -----------------------------------------------------------------------------


def make_home(
    root: Path, *, model_bytes: int, intake_workers: int, intake_memory_mb: int
) -> ServerHome:
    """A fresh home on loopback with caps that admit the models and the chosen intake."""
    home = create_home(root)
    config = home.config
    config = dataclasses.replace(
        config,
        network=dataclasses.replace(config.network, listen="127.0.0.1"),
        limits=dataclasses.replace(
            config.limits, max_upload_bytes=max(config.limits.max_upload_bytes, model_bytes + _MB)
        ),
        intake=dataclasses.replace(
            config.intake, workers=intake_workers, memory_mb=intake_memory_mb
        ),
    )
    (root / CONFIG_NAME).unlink()
    write_config(root / CONFIG_NAME, config)
    return ServerHome.open(root)


def enroll(home: ServerHome, count: int) -> list[Ed25519PrivateKey]:
    """`count` owners with fresh keys on the allow-list."""
    keys = [generate_signing_key() for _ in range(count)]
    with home.open_store() as store:
        for index, key in enumerate(keys):
            public = key.public_key()
            store.add_client(
                f"owner{index}",
                key_id=key_id(public),
                public_key_pem=public_key_pem(public).decode(),
            )
    return keys


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int


def start_server(home: ServerHome, *, insecure: bool = False) -> Server:
    """Run ``free-server start --no-flower`` on a free loopback port (plaintext if asked)."""
    command = [
        str(Path(sys.executable).parent / "free-server"),
        "start",
        "--home",
        str(home.root),
        "--port",
        "0",
        "--no-flower",
        *(["--insecure"] if insecure else []),
    ]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    log = (home.root / "server.log").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    found = _LISTENING.search(line)
    if found is None:
        process.kill()
        raise SystemExit(f"free-server start did not come up: {line!r}; see {home.root}/server.log")
    return Server(process, int(found.group(2)))


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def _intake_workers(pid: int) -> list[int]:
    """The full-intake workers of server `pid`: children of its intake fork server."""
    return [w for server in _workers(pid, b"intake_forkserver") for w in _children(server)]


def _intake_cpu(pid: int) -> float:
    """CPU seconds of the finished intake workers of server `pid`.

    Their fork server reaps them, so their CPU is in its count of reaped children
    (and in the server's, for a fork server that ended).
    """
    total = cpu_seconds(pid)[1]
    for server in _workers(pid, b"intake_forkserver"):
        try:
            own, reaped = cpu_seconds(server)
        except OSError:
            continue
        total += own + reaped
    return total


def _workers(pid: int, module: bytes) -> list[int]:
    """Children of `pid` running a worker module (``static_worker``, ``intake_forkserver``).

    Only once they exec it: between fork and exec a child still shows the
    server's own memory.
    """
    found = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if module in command:
            found.append(child)
    return found


class MemoryWatch:
    """Samples the server's RSS and its workers' (intake, static checks) peaks in a thread."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak_rss_kb = 0
        self.worker_peak_kb = 0
        self.static_peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.peak_rss_kb = max(self.peak_rss_kb, _status_kb(self.pid, "VmRSS"))
                for child in _intake_workers(self.pid):
                    self.worker_peak_kb = max(self.worker_peak_kb, _status_kb(child, "VmHWM"))
                for child in _workers(self.pid, b"static_worker"):
                    self.static_peak_kb = max(self.static_peak_kb, _status_kb(child, "VmHWM"))
            except OSError:
                continue  # a worker ended between listing and reading


# --- the owners -----------------------------------------------------------------------------


@dataclass
class Outcome:
    latency_s: float | None = None
    submission_id: str | None = None
    busy_retries: int = 0
    unavailable_retries: int = 0
    handshake_retries: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Generator:
    """What one load generator process needs: where the server is, what to send."""

    address: str
    ca: Path
    server_pub: Path
    model_size: int
    chunk_bytes: int
    deadline_s: float
    insecure: bool
    owners: Literal["asyncio", "threads"] = "asyncio"


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


def run_owner(
    connection: Connection,
    key: Ed25519PrivateKey,
    data: bytes,
    server_pub: Any,
    go: Callable[[], float],
    spec: Generator,
    outcome: Outcome,
) -> None:
    """One owner: wait for the common start, upload, retry busy or unavailable calls."""
    rng = random.Random(key_id(key.public_key()))  # noqa: S311 (backoff jitter)
    with ExchangeClient(connection, key) as client:
        t0 = go()
        attempt = 0
        while time.monotonic() - t0 < spec.deadline_s:
            signed = sign_manifest(key, data, TASK)
            try:
                reply = client.submit(
                    signed, _chunks(data, spec.chunk_bytes), timeout_s=spec.deadline_s
                )
            except ServerRefused as exc:
                if exc.status != "RESOURCE_EXHAUSTED" or BUSY not in exc.message:
                    outcome.error = exc.message
                    return
                outcome.busy_retries += 1
            except ServerUnavailable as exc:
                outcome.unavailable_retries += 1
                outcome.error = exc.message
            except TlsError as exc:
                # Under load a handshake can fail for want of server time ("handshaker
                # shutdown"): HandshakeDropped, a TlsError the uploader retries too.
                outcome.handshake_retries += 1
                outcome.error = exc.message
            except FreeError as exc:
                outcome.error = exc.message
                return
            else:
                check_receipt(reply, signed.record, server_pub)
                outcome.latency_s = time.monotonic() - t0
                outcome.submission_id, outcome.error = reply.record.submission_id, None
                return
            attempt += 1
            time.sleep(_backoff(rng, attempt))
        outcome.error = outcome.error or "no receipt before the deadline"


def _backoff(rng: random.Random, attempt: int) -> float:
    return rng.uniform(0, min(2.0, 0.1 * 2 ** min(attempt, 8)))


async def run_owner_async(
    connection: Connection,
    key: Ed25519PrivateKey,
    data: bytes,
    server_pub: Any,
    spec: Generator,
    t0: float,
    outcome: Outcome,
) -> None:
    """One owner on grpc's asyncio client: the same channel options, call signature,
    request stream and receipt check as `ExchangeClient.submit`, without its threads.

    The blocking client waits with a thread per call and per request stream, each
    waking ten times a second; with hundreds of owners to a process those wake-ups,
    not the uploads, took most of the generator's CPU (docs/performance.md).
    """
    rng = random.Random(key_id(key.public_key()))  # noqa: S311 (backoff jitter)
    options = list(CHANNEL_OPTIONS)
    channel = (
        grpc.aio.insecure_channel(spec.address, options=options)
        if spec.insecure
        else grpc.aio.secure_channel(spec.address, channel_credentials(connection), options=options)
    )
    path = method_path("Submit")
    submit = channel.stream_unary(
        path,
        request_serializer=pb.SubmitRequest.SerializeToString,
        response_deserializer=pb.SignedReceipt.FromString,
    )
    attempt = 0
    async with channel:
        while time.monotonic() - t0 < spec.deadline_s:
            signed = sign_manifest(key, data, TASK)
            requests = wire.submit_requests(signed, _chunks(data, spec.chunk_bytes))
            try:
                reply = await submit(
                    requests, timeout=spec.deadline_s, metadata=sign_call(key, path)
                )
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and BUSY in details:
                    outcome.busy_retries += 1
                elif exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    outcome.error = f"{exc.code().name}: {details}"
                    return
                elif "handshake" in details.lower():
                    outcome.handshake_retries += 1
                else:
                    outcome.unavailable_retries += 1
                outcome.error = details
            else:
                receipt = wire.signed_receipt_from_proto(reply)
                check_receipt(receipt, signed.record, server_pub)
                outcome.latency_s = time.monotonic() - t0
                outcome.submission_id, outcome.error = receipt.record.submission_id, None
                return
            attempt += 1
            await asyncio.sleep(_backoff(rng, attempt))
        outcome.error = outcome.error or "no receipt before the deadline"


def generate(
    spec: Generator,
    owners: list[tuple[int, bytes]],
    ready: Any,
    start: Any,
    t0: Any,
    results: Any,
) -> None:
    """One generator process: its owners (index, raw private key), all at once.

    With ``spec.owners == "threads"`` each owner is a thread with its own
    `ExchangeClient`; with ``"asyncio"``, a task on one event loop. Reports the
    outcomes and the CPU seconds the process spent from the start to its last
    receipt, so the generator's own cost is known apart from the server's.
    """
    template = template_model(spec.model_size)
    connection = (
        Connection(spec.address, insecure=True)
        if spec.insecure
        else Connection(spec.address, ca=spec.ca)
    )
    server_pub = load_public_key(spec.server_pub)
    work = [
        (Ed25519PrivateKey.from_private_bytes(raw), owner_model(template, index), Outcome())
        for index, raw in owners
    ]
    prepare = _owner_threads if spec.owners == "threads" else _owner_tasks
    run = prepare(spec, connection, server_pub, work, t0)
    ready.wait()
    start.wait()
    # The owners go only once the clock has started: woken by the shared start event
    # themselves, they took the GIL first and this thread counted only the tail of the run.
    before = os.times()
    run()
    after = os.times()
    cpu = after.user + after.system - before.user - before.system
    results.put((os.getpid(), cpu, [dataclasses.asdict(o) for _, _, o in work]))


_Work = list[tuple[Ed25519PrivateKey, bytes, Outcome]]


def _owner_threads(
    spec: Generator, connection: Connection, server_pub: Any, work: _Work, t0: Any
) -> Callable[[], None]:
    """Start a thread per owner, each held until the returned call lets them go and waits."""
    local = threading.Barrier(len(work) + 1)
    released = threading.Event()

    def go() -> float:
        local.wait()
        released.wait()
        return float(t0.value)

    threads = [
        threading.Thread(
            target=run_owner,
            args=(connection, key, data, server_pub, go, spec, outcome),
            daemon=True,
        )
        for key, data, outcome in work
    ]
    for thread in threads:
        thread.start()
    local.wait()  # every channel object made

    def run() -> None:
        released.set()
        for thread in threads:
            thread.join(spec.deadline_s + 60)

    return run


def _owner_tasks(
    spec: Generator, connection: Connection, server_pub: Any, work: _Work, t0: Any
) -> Callable[[], None]:
    """Return the call that runs every owner as a task of one event loop."""

    async def everyone() -> None:
        await asyncio.gather(
            *(
                run_owner_async(connection, key, data, server_pub, spec, t0.value, outcome)
                for key, data, outcome in work
            )
        )

    return lambda: asyncio.run(everyone())


# --- the run --------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def _wait_for_verdicts(
    home: ServerHome, ids: set[int], t0: float, limit_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        with home.open_store() as store:
            rows = [store.submission(i) for i in ids]
        states = [r.state for r in rows]
        if "received" not in states or time.monotonic() > deadline:
            return {
                "verdict_s": time.monotonic() - t0 if "received" not in states else None,
                "verdict_waited_s": time.monotonic() - t0,
                "accepted": states.count("accepted"),
                "refused": states.count("refused"),
                "pending": states.count("received"),
            }
        time.sleep(0.5)


def _stored_once(home: ServerHome, keys: list[Ed25519PrivateKey], digests: list[str]) -> int:
    with home.open_store() as store:
        rows = store.summary(recent=10**6).submissions
        by_owner: dict[str, list[Any]] = {}
        for row in rows:
            by_owner.setdefault(row.client_key_id, []).append(row)
        once = 0
        for key, digest in zip(keys, digests, strict=True):
            mine = by_owner.get(key_id(key.public_key()), [])
            if len(mine) != 1:
                continue
            row = mine[0]
            blob = store.blob_path(row.sha256).read_bytes()
            once += row.sha256 == digest == hashlib.sha256(blob).hexdigest()
        return once


def _static_worker_cpu(pid: int) -> float:
    total = 0.0
    for child in _workers(pid, b"static_worker"):
        try:
            total += cpu_seconds(child)[0]
        except OSError:
            continue
    return total


def _start_generators(
    spec: Generator, keys: list[Ed25519PrivateKey], procs: int
) -> tuple[list[Any], Any, Any, Any, Any]:
    """Spawn `procs` generator processes, the owners dealt out round robin."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that imported grpc
    ready, start = context.Barrier(procs + 1), context.Event()
    t0, results = context.Value("d", 0.0), context.Queue()
    owners = [(i, key.private_bytes_raw()) for i, key in enumerate(keys)]
    processes = [
        context.Process(
            target=generate, args=(spec, owners[p::procs], ready, start, t0, results), daemon=True
        )
        for p in range(procs)
    ]
    for process in processes:
        process.start()
    return processes, ready, start, t0, results


_WAIT_PROFILE = "server-py-spy-threads.txt"


def _profile_report(folder: Path) -> dict[str, Any]:
    """The CPU split of the exchange process from its perf and py-spy recordings."""
    report: dict[str, Any] = {"folder": str(folder)}
    if (folder / "server.perf.data").is_file():
        report["perf_on_cpu"] = perf_split(folder / "server.perf.data")
    if (folder / "server-py-spy.txt").is_file():
        raw = folder / "server-py-spy.txt"
        report["py_spy_gil_split"] = {k: round(v, 3) for k, v in profile_split(raw).items()}
        report["py_spy_top_frames"] = [[f, round(v, 3)] for f, v in top_frames(raw)]
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark and return its report."""
    size = int(args.model_mb * _MB)
    template = template_model(size)
    model_bytes = len(owner_model(template, 0))
    digests = [hashlib.sha256(owner_model(template, i)).hexdigest() for i in range(args.clients)]
    del template
    procs = max(1, min(args.procs, args.clients))
    with tempfile.TemporaryDirectory(prefix="free-load-") as workdir:
        home = make_home(
            Path(workdir) / "home",
            model_bytes=model_bytes,
            intake_workers=args.intake_workers,
            intake_memory_mb=args.intake_memory_mb,
        )
        keys = enroll(home, args.clients)
        server = start_server(home, insecure=args.insecure)
        profiler = perf = None
        try:
            spec = Generator(
                f"127.0.0.1:{server.port}",
                home.ca_cert,
                home.signing_pub,
                size,
                args.chunk_kb * 1024,
                args.deadline_s,
                args.insecure,
                args.owners,
            )
            processes, ready, start, t0, results = _start_generators(spec, keys, procs)
            ready.wait()  # every generator has its models and channels
            time.sleep(args.settle_s)  # let start-up allocations settle before the baseline
            pid = server.process.pid
            idle_kb = _status_kb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS
            watch = MemoryWatch(pid)
            watch.start()
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                profiler = start_profiler(pid, args.profile / "server-py-spy.txt")
                perf = start_perf(pid, args.profile / "server.perf.data")
            elif args.wait_profile is not None:
                args.wait_profile.mkdir(parents=True, exist_ok=True)
                profiler = start_wait_profiler(pid, args.wait_profile / _WAIT_PROFILE)
            load0 = os.getloadavg()
            server_cpu0, reaped0 = cpu_seconds(pid)[0], _intake_cpu(pid)
            threads0 = thread_cpu(pid)
            static0 = _static_worker_cpu(pid)
            t0.value = time.monotonic()
            start.set()
            reports = [results.get(timeout=args.deadline_s + 120) for _ in processes]
            for process in processes:
                process.join(60)
            outcomes = [Outcome(**o) for _, _, batch in reports for o in batch]
            acked = [o for o in outcomes if o.submission_id is not None]
            latencies = [o.latency_s for o in acked if o.latency_s is not None]
            last_receipt_s = max(latencies, default=0.0)
            server_cpu1, reaped1 = cpu_seconds(pid)[0], _intake_cpu(pid)
            threads1 = thread_cpu(pid)
            static1 = _static_worker_cpu(pid)
            if profiler is not None:
                stop_profiler(profiler)
            if perf is not None:
                stop_profiler(perf)
            receipts_peak_kb = max(_status_kb(pid, "VmHWM"), watch.peak_rss_kb)
            ids = {int(o.submission_id) for o in acked if o.submission_id is not None}
            verdicts = _wait_for_verdicts(home, ids, t0.value, args.verdict_limit_s)
            watch.stop()
            load1 = os.getloadavg()
            server_cpu2, reaped2 = cpu_seconds(pid)[0], _intake_cpu(pid)
            # Intake threads stream each blob to their worker: the verdict phase counts too.
            peak_kb = max(_status_kb(pid, "VmHWM"), watch.peak_rss_kb)
            stored_once = _stored_once(home, keys, digests)
            errors = sorted({o.error for o in outcomes if o.error and o.submission_id is None})
        finally:
            for sampler in (profiler, perf):
                if sampler is not None and sampler.poll() is None:
                    stop_profiler(sampler)
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(60)
            except subprocess.TimeoutExpired:
                server.process.kill()
    decided = verdicts["accepted"] + verdicts["refused"]
    report: dict[str, Any] = {
        "clients": args.clients,
        "model_bytes": model_bytes,
        "acknowledged": len(acked),
        "stored_once": stored_once,
        "throughput_per_s": len(acked) / last_receipt_s if latencies else 0.0,
        "throughput_mb_per_s": len(acked) * model_bytes / _MB / last_receipt_s
        if latencies
        else 0.0,
        "p50_s": _percentile(latencies, 0.50),
        "p99_s": _percentile(latencies, 0.99),
        "last_receipt_s": last_receipt_s,
        "busy_retries": sum(o.busy_retries for o in outcomes),
        "unavailable_retries": sum(o.unavailable_retries for o in outcomes),
        "handshake_retries": sum(o.handshake_retries for o in outcomes),
        "errors": errors,
        **verdicts,
        # Wall time per verdict, also when the wait ended with models still pending.
        "verdict_s_per_model": verdicts["verdict_waited_s"] / decided if decided else None,
        "intake_cpu_s_per_model": (reaped2 - reaped0) / decided if decided else None,
        "cpu_s_until_receipts": {
            "exchange_process": server_cpu1 - server_cpu0,
            "exchange_threads": {
                name: round(cpu - threads0.get(name, 0.0), 2)
                for name, cpu in sorted(threads1.items())
                if cpu - threads0.get(name, 0.0) >= 0.05
            },
            "static_check_workers": static1 - static0,
            "intake_workers": reaped1 - reaped0,
            "load_generator": sum(cpu for _, cpu, _ in reports),
            "load_generator_processes": procs,
        },
        "cpu_s_after_receipts": {
            "exchange_process": server_cpu2 - server_cpu1,
            "intake_workers": reaped2 - reaped1,
        },
        "server_idle_rss_mb": idle_kb / 1024,
        "server_peak_rss_mb": peak_kb / 1024,
        "server_rss_growth_mb": (peak_kb - idle_kb) / 1024,
        "server_rss_growth_until_receipts_mb": (receipts_peak_kb - idle_kb) / 1024,
        "intake_workers": args.intake_workers,
        "intake_worker_memory_limit_mb": args.intake_memory_mb,
        "intake_worker_peak_rss_mb_sampled": watch.worker_peak_kb / 1024,
        "static_check_worker_peak_rss_mb_sampled": watch.static_peak_kb / 1024,
        "chunk_bytes": args.chunk_kb * 1024,
        "transport": "plaintext (--insecure)" if args.insecure else "TLS",
        "owners": args.owners,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load0],
        "load_average_after": [round(x, 2) for x in load1],
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
    if args.profile is not None:
        report["profile"] = _profile_report(args.profile)
    elif args.wait_profile is not None:
        states = thread_states(args.wait_profile / _WAIT_PROFILE)
        report["thread_states_until_receipts"] = {
            group: [[state, round(share, 3)] for state, share in shares]
            for group, shares in states.items()
        }
    return report


def main() -> None:
    """Parse the options, run, print the JSON report and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent owners")
    parser.add_argument("--model-mb", type=float, default=5.0, help="model size in MiB")
    parser.add_argument("--chunk-kb", type=int, default=256, help="upload chunk size")
    parser.add_argument("--intake-workers", type=int, default=2, help="intake.workers of the home")
    parser.add_argument("--intake-memory-mb", type=int, default=2048, help="intake.memory_mb")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="give up uploading after")
    parser.add_argument(
        "--verdict-limit-s", type=float, default=1800.0, help="stop waiting for verdicts after"
    )
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle time before the baseline")
    parser.add_argument(
        "--procs", type=int, default=4, help="load generator processes the owners run in"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext (to measure what TLS costs)"
    )
    parser.add_argument(
        "--profile", type=Path, help="folder for perf and py-spy recordings of the server"
    )
    parser.add_argument(
        "--wait-profile",
        type=Path,
        help="folder for a py-spy recording of every server thread, waits included"
        " (instead of --profile)",
    )
    parser.add_argument(
        "--owners",
        choices=("asyncio", "threads"),
        default="asyncio",
        help="each owner a task of one event loop per generator process (asyncio), or a"
        " thread with its own free_client ExchangeClient (threads)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally`
    if not 1 <= args.clients <= 1000:
        parser.error("--clients must be 1..1000")
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    if args.profile is not None and args.wait_profile is not None:
        parser.error("--profile and --wait-profile sample the same process: give one")
    report = run(args)
    text = json.dumps(report, indent=1, allow_nan=False)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
