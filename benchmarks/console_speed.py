"""Console page render time with 1,000 submissions and 50 rounds in a store.

Builds a server home (`free-server init`'s `create_home`) and fills its store through
the store's own API: `--owners` enrolled owners, `--submissions` stored submissions
(a fifth refused, with reasons of a few kinds; the rest accepted), `--rounds` rounds
(the last one running, one failed in ten, the others finished, each with a signed
release and a round journal of `--steps` engine steps with a meta-val score every 10).
Then it serves the console (`ConsoleServer`, TLS, read-only store, the same code
`free-server start --console-port` runs) and times `--repeats` GETs of every page over
one kept-alive HTTPS connection, after one warm-up GET each. It writes JSON plus a
Markdown table; the target is under 300 ms per page.

Usage::

    .venv/bin/python benchmarks/console_speed.py --out benchmarks/results/console-speed.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import secrets
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pool_scale import TASK  # this folder's: the same tiny task

# The submissions are stored the way the test suite's harness stores them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flower_harness import store_submission

from free_common.engine import CheckpointSaved, Evaluated, RoundFinished, RoundStarted, StepFinished
from free_common.security.canonical import canonical_bytes
from free_common.security.keys import generate_signing_key, key_id, load_private_key, public_key_pem
from free_common.security.signing import sign
from free_common.types import ReleaseManifest
from free_server.console.app import ConsoleServer
from free_server.console.auth import add_token
from free_server.home import ServerHome, create_home
from free_server.round_journal import JOURNAL_NAME, RoundJournal, round_dir
from free_server.store import Store

REASONS = (
    "operator Loop is not on the intake allow-list: export the model without loops",
    "the model is 70123456 bytes, over the 67108864-byte cap: send a smaller model",
    "torch and onnxruntime disagree by 0.031 (tolerance 0.001): export with opset 17",
    "the model's output has 10 logits per image, not the 5 classes declared",
)


def _fill(home: ServerHome, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    """Fill the store; return how many rounds ended in each state."""
    server_key = load_private_key(home.signing_key)
    keys = [generate_signing_key() for _ in range(args.owners)]
    with home.open_store() as store:
        for index, key in enumerate(keys):
            pem = public_key_pem(key.public_key()).decode("ascii")
            store.add_client(
                f"owner-{index:03d}", key_id=key_id(key.public_key()), public_key_pem=pem
            )
        accepted: list[int] = []
        for number in range(args.submissions):
            key = keys[number % len(keys)]
            accepted += _submission(store, key, rng, refuse=number % 5 == 4)
        ends = [
            _round(home, store, server_key, n, args, accepted, rng)
            for n in range(1, args.rounds + 1)
        ]
    return {state: ends.count(state) for state in ("finished", "failed", "running")}


def _submission(
    store: Store, key: Ed25519PrivateKey, rng: random.Random, *, refuse: bool
) -> list[int]:
    payload = secrets.token_bytes(rng.randint(2_000, 8_000))
    submission_id = store_submission(store, key, payload, TASK)
    reason = rng.choice(REASONS) if refuse else None
    store.set_verdict(submission_id, accepted=not refuse, reason=reason)
    return [] if refuse else [submission_id]


def _round(
    home: ServerHome,
    store: Store,
    server_key: Ed25519PrivateKey,
    number: int,
    args: argparse.Namespace,
    accepted: list[int],
    rng: random.Random,
) -> str:
    row = store.request_round("cpu")
    store.start_round(row.id)
    journal = RoundJournal(round_dir(home.root, row.id) / JOURNAL_NAME)
    last = number == args.rounds
    steps = args.steps // 2 if last else args.steps
    journal(RoundStarted(number, args.steps, 0, 5, 24, (), "cpu", False, number > 1))
    for step in range(1, steps + 1):
        phase = "warmup" if step <= 5 else "meta"
        accuracy, seconds = rng.uniform(0.6, 0.95), rng.uniform(0.4, 0.8)
        journal(
            StepFinished(
                number,
                step,
                args.steps,
                phase,
                ("1", "2"),
                1.2,
                accuracy,
                seconds,
                0.8,
                1.1,
                4,
                seconds + 0.5,
            )
        )
        if step % 10 == 0:
            journal(Evaluated(number, step, "meta-val", rng.uniform(0.4, 0.7), 0.03, 50, False))
        if step % 100 == 0:
            journal(CheckpointSaved(number, step, str(home.root / "engine" / "state.safetensors")))
    if not last:
        journal(RoundFinished(number, args.steps, args.steps, "meta-val", 900.0))
    journal.close()
    if last:
        return "running"
    if number % 10 == 5:
        store.finish_round(row.id, "a 24-model round needs at least 3 usable accepted models")
        return "failed"
    weights = secrets.token_bytes(120_000)
    version = store.next_release_version()
    metrics = {
        "teacher_accuracy": rng.uniform(0.6, 0.9),
        "recoveries": 2400,
        "recovery_seconds_per_teacher": rng.uniform(0.4, 0.8),
        "round_seconds": 900.0,
    }
    manifest = ReleaseManifest(
        version=version,
        architecture="conv4",
        config_json=json.dumps({"preset": "cpu", "round": number}),
        payload_sha256=hashlib.sha256(weights).hexdigest(),
        payload_size=len(weights),
        source_submission_ids=tuple(str(i) for i in rng.sample(accepted, 24)),
        metrics_json=json.dumps(metrics, sort_keys=True),
        created_at_ms=int(time.time() * 1000),
        server_key_id=key_id(server_key.public_key()),
    )
    with store.blob_writer(len(weights)) as writer:
        writer.write(weights)
        store.record_release(
            writer.finish(),
            version=version,
            manifest=canonical_bytes(manifest),
            signature=sign(server_key, manifest).signature,
            round_id=row.id,
        )
    for owner in range(3):
        store.record_evaluation(row.id, f"owner-{owner:03d}", {"accuracy": 0.9, "stored": 1})
    store.finish_round(row.id)
    return "finished"


def _time(client: httpx.Client, url: str, repeats: int) -> list[float]:
    assert client.get(url).status_code == 200  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reply = client.get(url)
        times.append(time.perf_counter() - start)
        assert reply.status_code == 200, (url, reply.status_code)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=100)
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # Seeded figures for a benchmark store; nothing secret comes from it.
    rng = random.Random(args.seed)  # noqa: S311
    with tempfile.TemporaryDirectory() as folder:
        home = create_home(Path(folder) / "home")
        clock = time.perf_counter()
        ends = _fill(home, args, rng)
        fill_s = time.perf_counter() - clock
        token = add_token(home.root)
        console = ConsoleServer(home, 0)
        console.start()
        try:
            base = console.url.rstrip("/")
            pages = [
                "/",
                "/owners",
                "/submissions",
                "/submissions?state=refused",
                "/rounds",
                f"/rounds/{args.rounds - 1}",
                f"/rounds/{args.rounds}",
                "/releases",
                "/releases/1/manifest.json",
                "/metrics",
            ]
            trust = ssl.create_default_context(cafile=str(home.ca_cert))
            headers = {"authorization": f"Bearer {token}"}
            with httpx.Client(verify=trust, headers=headers) as client:
                timed = {page: _time(client, base + page, args.repeats) for page in pages}
        finally:
            console.stop(2.0)
    rows = [
        {
            "page": page,
            "median_ms": 1000 * statistics.median(times),
            "p95_ms": 1000 * sorted(times)[math.ceil(0.95 * len(times)) - 1],
            "max_ms": 1000 * max(times),
        }
        for page, times in timed.items()
    ]
    result = {
        "command": "python " + " ".join(sys.argv),
        "store": {
            "owners": args.owners,
            "submissions": args.submissions,
            "rounds": args.rounds,
            "round_ends": ends,
            "journal_steps": args.steps,
        },
        "fill_seconds": fill_s,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1min": os.getloadavg()[0],
        },
        "target_ms": 300,
        "pages": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Console page render time",
        "",
        f"`{result['command']}`",
        "",
        f"A store of {args.owners} owners, {args.submissions} submissions (a fifth refused) and "
        f"{args.rounds} rounds ({ends['finished']} finished with a release,"
        f" {ends['failed']} failed,"
        f" {ends['running']} running), each with a journal of {args.steps} steps (half for the"
        f" running one); the console over TLS on loopback, one kept-alive "
        f"connection, {args.repeats} GETs per page after a warm-up. {os.cpu_count()} CPUs, "
        f"1-minute load {result['machine']['load_1min']:.1f} at the end. Target: under 300 ms.",
        "",
        "| page | median ms | p95 ms | max ms |",
        "|---|---:|---:|---:|",
        *(
            f"| `{r['page']}` | {r['median_ms']:.0f} | {r['p95_ms']:.0f} | {r['max_ms']:.0f} |"
            for r in rows
        ),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
