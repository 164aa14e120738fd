"""A federation of N virtual owners: real intake, the server's round on Flower's simulation engine.

For each owner count it runs, in a fresh process (so peak memory is that count's own):

1. set-up: a server home on loopback (preset ``simulate``); per owner a key pair
   (`free_client.keygen`), its enrolment, a tiny data folder of its own (5 meta-test
   classes cut from the glyph set) and a teacher (zoo teacher ``i mod len(zoo)``);
2. intake: the server's exchange service and intake workers (`free_server.runtime`
   without its Flower plane) on loopback TLS; every owner uploads its signed model
   (`free_client.uploader`) and waits for the verdict; owners who drop while uploading
   are cut off half way;
3. round, push, evaluation: a round request (what ``free-server run`` writes), then the
   server's own round scheduler starts it as a Flower run on the simulation engine
   (`free_common.bench.simulate.SimulatedRuns`) with the round app's ServerApp
   (`free_server.server_app`) and ClientApp (`free_client.client_app`): the meta round,
   the signed release, its push to every joined owner, who verifies, stores and
   fine-tunes it on its own folder and replies with its accuracy.

Stage times (wall clock): intake from the first upload to the last verdict; round from
the round's start to the release's publication; push from the publication until the
last live owner had the release verified and stored on its disk; evaluation from the
publication until the last owner's accuracy was recorded (so it includes the push).
Server peak RSS is this process's high-water mark after set-up (exchange, store,
scheduler, ServerApp and Flower's in-memory link state live here; intake workers and
the owners' Ray actors are other processes).

Usage::

    .venv/bin/python benchmarks/simulate.py --owners 10 100 1000 \\
        --data data-cache/benchmark --zoo data-cache/zoo-bench-conv4-30 \\
        --out benchmarks/results/simulate.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process on shared cores

from free_client.client_app import app as client_app
from free_client.keygen import KeyPaths, generate_keys
from free_client.node_settings import JoinSettings
from free_client.stub import Connection, ExchangeClient
from free_client.task_flags import TaskFlags, resolve_task
from free_client.uploader import sign_manifest, upload, wait_for_verdict
from free_common.bench.demo import configure_home
from free_common.bench.figures import line_chart
from free_common.bench.folders import export_class_folders
from free_common.bench.simulate import (
    OWN_TRANSPORT,
    OwnerDropped,
    OwnerFate,
    SimulatedRuns,
    draw_fates,
    environment_restored,
    ray_backend_config,
)
from free_common.data.sources import load_split
from free_common.errors import FreeError
from free_common.flower_app import flower_environment
from free_common.security.keys import key_id, load_private_key, load_public_key, public_key_pem
from free_common.types import VerdictState
from free_server.home import ServerHome, create_home
from free_server.runtime import ServerRuntime, StartOptions
from free_server.scheduler import RoundScheduler, SchedulerSettings
from free_server.server_app import app as server_app
from free_server.superlink import SuperLinkPaths

ROOT = Path(__file__).resolve().parents[1]
PRESET = "simulate"
ROUND_PRESET: dict[str, Any] = {
    "base": "smoke",
    "steps": 20,
    "warmup_steps": 2,
    "teachers_per_step": 2,
    "min_teachers": 2,
    "checkpoint_every": 10,
}
"""The benchmark's round: `smoke`, 20 steps; the learner's input follows the teachers'."""


@dataclass(frozen=True)
class OwnerPlan:
    """One virtual owner: its keys, model, data and fate."""

    name: str
    keys: KeyPaths
    model: Path
    data: Path
    fate: OwnerFate

    @property
    def releases(self) -> Path:
        return self.keys.client_key.parent / "releases"


@dataclass(frozen=True)
class SimConfig:
    """One simulated federation.

    Attributes
    ----------
    owners
        Virtual owners.
    work
        A new folder for the home, the owners and the logs.
    teachers
        ONNX teacher files; owner ``i`` submits ``teachers[i % len(teachers)]``.
    owner_data
        Writes owner ``i``'s data folder at the given path (class folders).
    preset
        The round preset, written to ``HOME/presets/simulate.json``.
    drop_rate, seed
        `draw_fates`; the seed also seeds the round's preset and the owners' episodes.
    cpus
        Ray's CPUs: owners' nodes run this many at a time.
    episodes, shots, queries
        Each owner's fine-tuning of the release (`free-client join` options).
    upload_threads
        Owners uploading at the same time.
    reply_timeout_s
        How long the push waits for replies.
    """

    owners: int
    work: Path
    teachers: Sequence[Path]
    owner_data: Callable[[int, Path], None]
    preset: dict[str, Any]
    drop_rate: float = 0.1
    seed: int = 0
    cpus: int = 2
    episodes: int = 2
    shots: int = 1
    queries: int = 5
    upload_threads: int = 4
    reply_timeout_s: float = 3600.0


def _make_home(config: SimConfig) -> ServerHome:
    root = config.work / "home"
    create_home(root)
    # No SuperLink runs here; min_models is out of reach so only the request starts a round.
    configure_home(
        root / "config.toml",
        listen="127.0.0.1",
        superlink_port=1,
        preset=PRESET,
        min_models=10**9,
        workers=config.cpus,
    )
    preset = {**config.preset, "seed": config.seed}
    (root / "presets").mkdir(exist_ok=True)
    (root / "presets" / f"{PRESET}.json").write_text(json.dumps(preset, indent=2) + "\n")
    return ServerHome.open(root)


def _plan_owners(config: SimConfig, home: ServerHome) -> list[OwnerPlan]:
    fates = draw_fates(config.owners, config.drop_rate, config.seed)
    owners = []
    with home.open_store() as store:
        for index, fate in enumerate(fates):
            name = f"owner-{index + 1:04d}"
            folder = config.work / "owners" / name
            keys = generate_keys(folder)
            public = load_public_key(keys.client_pub)
            store.add_client(
                name, key_id=key_id(public), public_key_pem=public_key_pem(public).decode("ascii")
            )
            config.owner_data(index, folder / "data")
            model = config.teachers[index % len(config.teachers)]
            owners.append(OwnerPlan(name, keys, model, folder / "data", fate))
    return owners


@dataclass
class IntakeTally:
    """What the intake stage saw."""

    accepted: int = 0
    refused: int = 0
    cut_off: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cut_stream(data: bytes) -> Iterator[bytes]:
    """Half the model's bytes, then the owner goes away (the stream fails)."""
    yield data[: len(data) // 2]
    raise OwnerDropped("the owner dropped out while uploading")


def _submit(owner: OwnerPlan, target: Connection, home: ServerHome, tally: IntakeTally) -> None:
    key = load_private_key(owner.keys.client_key)
    data = owner.model.read_bytes()
    task = resolve_task(data, TaskFlags())
    with ExchangeClient(target, key) as client:
        if owner.fate is OwnerFate.DROPS_UPLOADING:
            try:
                client.submit(sign_manifest(key, data, task), _cut_stream(data), timeout_s=60.0)
            except OwnerDropped:  # the stub re-raises what broke the stream
                with tally.lock:
                    tally.cut_off += 1
                return
            with tally.lock:
                tally.errors.append(f"{owner.name}: a cut-off upload got a receipt")
            return
        try:
            receipt = upload(
                client,
                key,
                data,
                task,
                label=f"{owner.name} uploading",
                server_pub=load_public_key(home.signing_pub),
                notify=lambda _: None,
            )
            verdict = wait_for_verdict(client, receipt.record.submission_id, timeout_s=3600.0)
        except FreeError as exc:
            with tally.lock:
                tally.errors.append(f"{owner.name}: {exc.message}")
            return
    with tally.lock:
        if verdict.state is VerdictState.ACCEPTED:
            tally.accepted += 1
        else:
            tally.refused += 1
            tally.errors.append(f"{owner.name}: refused: {verdict.reason}")


def _join_settings(owner: OwnerPlan, home: ServerHome, config: SimConfig) -> dict[str, Any]:
    """The node config `free-client join --data` would give this owner's SuperNode."""
    settings = JoinSettings(
        server_pub=home.signing_pub,
        releases_dir=owner.releases,
        data_dir=owner.data,
        shots=config.shots,
        queries=config.queries,
        episodes=config.episodes,
        seed=config.seed,
    )
    return tomllib.loads(settings.to_toml())


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so set-up does not count.
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _round_outcome(home: ServerHome, round_id: int) -> dict[str, int]:
    """The push's ok/errors/missing counts, from the round's log line."""
    log_text = SuperLinkPaths.of(home).round_log(round_id).read_text(encoding="utf-8")
    for line in reversed(log_text.splitlines()):
        if "pushed release" in line:
            counts = line.rsplit(": ", 1)[1].split(", ")
            return {part.split()[1]: int(part.split()[0]) for part in counts}
    return {}


def simulate(config: SimConfig) -> dict[str, Any]:
    """Run one simulated federation end to end; return its figures and checks."""
    with environment_restored():
        os.environ.update(flower_environment(config.work / "flwr-home"))
        return _simulate(config)


def _simulate(config: SimConfig) -> dict[str, Any]:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    home = _make_home(config)
    owners = _plan_owners(config, home)
    setup_s = time.monotonic() - started
    _reset_peak_rss()

    runtime = ServerRuntime(home, StartOptions(port=0, flower=False))
    runtime.start()
    try:
        assert runtime.exchange is not None and runtime.store is not None
        target = Connection(server=runtime.exchange.address, ca=home.ca_cert)
        tally = IntakeTally()
        t0 = time.monotonic()
        with ThreadPoolExecutor(config.upload_threads) as pool:
            list(pool.map(lambda o: _submit(o, target, home, tally), owners))
        intake_s = time.monotonic() - t0

        joined = [o for o in owners if o.fate is not OwnerFate.DROPS_UPLOADING]
        runs = SimulatedRuns(
            server_app,
            client_app,
            [_join_settings(o, home, config) for o in joined],
            dropping=[i for i, o in enumerate(joined) if o.fate is OwnerFate.DROPS_AT_PUSH],
            backend_config=ray_backend_config(config.cpus),
        )
        store = runtime.store
        scheduler = RoundScheduler(
            home,
            store,
            runs,
            SchedulerSettings(
                min_models=10**9, preset=PRESET, reply_timeout_s=config.reply_timeout_s
            ),
        )
        request = store.request_round(PRESET)
        scheduler.tick()  # starts the round's run; returns when the run has ended
        scheduler.tick()  # settles it, as the scheduler's next look would
        round_row = store.round(request.id)
        release = store.latest_release()
        evaluations = store.evaluations(request.id)
        submissions = store.summary(recent=0).submission_counts
    finally:
        runtime.stop()
    peak_mb = _peak_rss_mb()

    live = [o for o in joined if o.fate is OwnerFate.LIVE]
    stored_at = [
        (o.releases / str(release.version) / "manifest.json").stat().st_mtime
        for o in live
        if release is not None and (o.releases / str(release.version) / "manifest.json").exists()
    ]
    published = release.created_at.timestamp() if release is not None else None
    accuracies = [e.metrics["accuracy"] for e in evaluations if "accuracy" in e.metrics]
    stages = {"setup": setup_s, "intake": intake_s}
    if round_row.started_at is not None and published is not None:
        stages["round"] = published - round_row.started_at.timestamp()
        stages["push"] = max(stored_at) - published if stored_at else float("nan")
        last = max(e.created_at.timestamp() for e in evaluations) if evaluations else published
        stages["evaluation"] = last - published
    return {
        "owners": config.owners,
        "drop_rate": config.drop_rate,
        "fates": {fate.value: sum(o.fate is fate for o in owners) for fate in OwnerFate},
        "intake": {
            "accepted": tally.accepted,
            "refused": tally.refused,
            "cut_off": tally.cut_off,
            "errors": tally.errors[:20],
            "store_counts": {str(k): v for k, v in submissions.items()},
        },
        "round": {
            "id": round_row.id,
            "state": round_row.state,
            "error": round_row.error,
            "release": None if release is None else release.version,
            "push": _round_outcome(home, request.id),
            "owners_with_release": len(stored_at),
            "evaluations": len(evaluations),
        },
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "server_peak_rss_mb": round(peak_mb, 1),
        "release_accuracy": {
            "mean": round(statistics.fmean(accuracies), 4) if accuracies else None,
            "stdev": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else None,
            "owners": len(accuracies),
        },
        "wall_s": round(time.monotonic() - started, 1),
        # The cores are shared: the machine's 1-minute load when the run began and ended.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def glyph_folders(data: Path, *, per_class: int, seed: int) -> Callable[[int, Path], None]:
    """Owner ``i``'s folder: 5 meta-test classes of the glyph set, drawn with seed+i."""
    split = load_split(data, "meta-test")

    def write(index: int, out: Path) -> None:
        export_class_folders(split, out, classes=5, per_class=per_class, seed=seed + index)

    return write


def _one(args: argparse.Namespace) -> None:
    teachers = sorted(Path(args.zoo).glob("*.onnx"))
    if not teachers:
        raise SystemExit(f"no .onnx teachers in {args.zoo}")
    channels, side = resolve_task(teachers[0].read_bytes(), TaskFlags()).input_shape[:2]
    preset = dict(ROUND_PRESET)
    for part in ("learner", "generator"):
        preset[part] = {"channels": channels, "image_size": side}
    with tempfile.TemporaryDirectory(prefix="free-simulate-") as scratch:
        config = SimConfig(
            owners=args.one,
            work=args.work or Path(scratch),
            teachers=teachers,
            owner_data=glyph_folders(
                Path(args.data), per_class=args.shots + args.queries, seed=args.seed
            ),
            preset=preset,
            drop_rate=args.drop_rate,
            seed=args.seed,
            cpus=args.cpus,
            episodes=args.episodes,
            shots=args.shots,
            queries=args.queries,
        )
        result = simulate(config)
    print(json.dumps(result), flush=True)


def _chart(results: list[dict[str, Any]], out: Path) -> None:
    from PIL import Image

    stages = ("intake", "round", "push", "evaluation")
    times = {
        stage: [(r["owners"], r["stages_s"][stage] / 60) for r in results if stage in r["stages_s"]]
        for stage in stages
    }
    counts = [r["owners"] for r in results]
    memory = {
        "server peak RSS": [(r["owners"], r["server_peak_rss_mb"]) for r in results],
        # The ceiling, so the axis shows the peak against it and not a zoom of noise.
        "target: 2 GB": [(min(counts), 2048.0), (max(counts), 2048.0)],
    }
    above_zero = (0.0, math.inf)
    left = line_chart(
        "wall time per stage", times, x_label="owners", y_label="minutes", bounds=above_zero
    )
    right = line_chart("server peak RSS", memory, x_label="owners", y_label="MB", bounds=above_zero)
    sheet = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width, 0))
    sheet.save(out)


def _markdown(results: list[dict[str, Any]], chart: Path) -> str:
    commands = list(dict.fromkeys(r["command"] for r in results))
    lines = [
        "# Simulated federations: real intake, the server's round on Flower's simulation engine",
        "",
        *[f"`{command}`\n" for command in commands],
        "on this 2-core machine (shared), one fresh process per owner count; drop rate"
        f" {results[0]['drop_rate'] if results else '-'} (half of the dropped owners are cut off"
        " while uploading, half fail during the push).",
        "",
        "| owners | live / cut off / fail at push | accepted | intake s (per model) | round s |"
        " push s | evaluation s | server peak RSS MB | release accuracy (owners) | total s |"
        " load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fates, s, acc = r["fates"], r["stages_s"], r["release_accuracy"]
        score = (
            f"{acc['mean']:.3f} +- {acc['stdev'] or 0:.3f} ({acc['owners']})"
            if acc["mean"] is not None
            else "-"
        )
        lines.append(
            f"| {r['owners']} | {fates['live']} / {fates['drops-uploading']} /"
            f" {fates['drops-at-push']} | {r['intake']['accepted']} | {s['intake']}"
            f" ({s['intake'] / max(r['intake']['accepted'], 1):.2f}) |"
            f" {s.get('round', '-')} | {s.get('push', '-')} | {s.get('evaluation', '-')} |"
            f" {r['server_peak_rss_mb']} | {score} | {r['wall_s']} |"
            f" {r['load_average'][0]}-{r['load_average'][1]} |"
        )
    lines += [
        "",
        f"![time and memory against owners]({chart.name})",
        "",
        "Stages: intake from the first upload to the last verdict; round from the round's"
        " start to the release's publication; push from the publication until the last live"
        " owner had verified and stored it; evaluation from the publication until the last"
        " owner's accuracy was recorded (it includes the push). Release accuracy: the owners'"
        " 5-way 1-shot accuracy after fine-tuning the release on their own folders (2 episodes"
        " each, 5 queries per class). Owner i submits zoo teacher i mod 30; the round (the"
        " `smoke` preset, 20 steps, 2 teachers a step) samples them from the whole accepted"
        " pool, ordered by model hash, so with the same owners that live the release is the"
        " same from run to run. Load: the machine's 1-minute load average"
        " at the start and the end of the run (2 cores, shared with other work).",
        "",
        "Not shared with a deployment: " + OWN_TRANSPORT,
        "",
        "Nor as in a deployment: the owners' uploads come from 4 threads of the server's own"
        " process, on the same two cores, over loopback TLS, and skip the local intake"
        " `free-client submit` runs before sending; the owners' ClientApps run two at a time"
        " in two Ray actors, not each on its own machine, so the push and the evaluation"
        " take the sum of the owners' fine-tuning divided by two cores.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--data", default="data-cache/benchmark")
    parser.add_argument("--zoo", default="data-cache/zoo-bench-conv4-30")
    parser.add_argument("--drop-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/simulate.json")
    parser.add_argument(
        "--append", action="store_true", help="add these owner counts to the runs in --out"
    )
    parser.add_argument("--work", type=Path, help="keep the home and owners here (--one only)")
    parser.add_argument("--one", type=int, help="run one owner count here; print its JSON")
    args = parser.parse_args()
    if args.one is not None:
        _one(args)
        return
    command = "python benchmarks/simulate.py " + " ".join(sys.argv[1:])
    results = _earlier_runs(args.out) if args.append else []
    for owners in args.owners:
        argv = [sys.executable, __file__, "--one", str(owners)]
        for name in ("data", "zoo", "drop_rate", "seed", "cpus", "episodes", "shots", "queries"):
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        done = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
        results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "command": command})
        print(json.dumps(results[-1]), flush=True)
        # Written after every count, so a long last one leaves the others' figures.
        report = {"transport": OWN_TRANSPORT, "runs": results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        chart = args.out.with_suffix(".png")
        _chart(results, chart)
        args.out.with_suffix(".md").write_text(_markdown(results, chart))


def _earlier_runs(path: Path) -> list[dict[str, Any]]:
    """The runs a results file holds, each with the command that made it."""
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    return [{"command": report.get("command", ""), **run} for run in report["runs"]]


if __name__ == "__main__":
    main()
