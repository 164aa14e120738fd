"""`make demo`: the whole FREE-Fed story on loopback, through the public commands only.

Every step is one of the commands a person would type (`free-bench`,
`free-server`, `free-client`), run as a subprocess with its output in
``OUT/logs/<step>.log``:

1. data: build the small glyph set, draw two episode pictures;
2. owners: train a zoo of simulated owners' classifiers (`free-bench zoo`), one
   per owner, on random meta-train classes;
3. aggregator: ``free-server init`` a home in ``OUT/home`` on loopback with the
   ``demo`` preset (``HOME/presets/demo.json``, a small `smoke`-based round) as
   its rounds preset and a round per ``--owners`` accepted models; each owner runs
   ``free-client keygen`` and is enrolled with ``free-server clients add``;
   owners who join get their own new tasks, five meta-test classes
   (``free-bench data export-folders``);
4. ``free-server start`` on free loopback ports; ``--joined`` owners run
   ``free-client join --data``; every owner runs ``free-client submit``;
5. the round starts by itself once every model is accepted; it publishes a
   signed release and pushes it to the joined owners, who verify it, store it
   and fine-tune it on their tasks (their accuracy shows in ``free-server
   status --json``);
6. one owner who did not join runs ``free-client fetch``, ``free-client
   finetune --export`` on its own tasks and ``free-client inspect`` on the
   exported model;
7. the release against a random initialization of the same network, on the same
   meta-test tasks (``free-client finetune --protocol paper`` with and without
   ``--random-init``);
8. everything is stopped (also on failure or Ctrl-C), a table is printed and
   ``OUT/summary.json`` written.

Run it with ``python -m free_common.bench.demo --out demo-output`` (``make demo``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from free_common.bench.demo_procs import Background, Processes, command_path, free_ports
from free_common.bench.demo_report import print_report
from free_common.console import out_console, run_app
from free_common.errors import ConfigError, DemoError

__all__ = ["DemoConfig", "main", "run_demo"]

_OWNED = ("home", "zoo", "owners", "meta-test", "logs", "summary.json")
"""What the demo writes in OUT, removed before it runs again."""

_ENV = {
    # One torch thread per process: on a small machine the server's round, the owners'
    # SuperNodes and their commands share the cores, and oversubscribed torch threads
    # made a round ten times slower in our measurements.
    "OMP_NUM_THREADS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "COLUMNS": "200",
    "NO_COLOR": "1",
}


@dataclass(frozen=True)
class DemoConfig:
    """How big the demo is.

    Attributes
    ----------
    out
        Folder for everything the demo writes.
    data
        Where the small glyph set is built (reused when up to date).
    owners
        Simulated data owners, one teacher each; a round starts when all are accepted.
    joined
        Owners among them who run `free-client join` with their own tasks.
    arch
        Architecture of the owners' teachers (`free-bench zoo --arch`).
    zoo_epochs
        Training epochs per teacher.
    preset
        Settings of ``HOME/presets/demo.json`` on top of its base preset, nested as
        the engine config prints them; the learner's input follows the data.
    shots
        Support images per class in every few-shot task.
    owner_episodes
        Tasks each owner fine-tunes the release on.
    eval_classes, eval_episodes, eval_shots
        Meta-test classes, and tasks per shot count, for the release against a random
        initialization of the same network.
    round_timeout_s
        How long to wait for the meta round and its push.
    seed
        Seeds the zoo and the owners' data draws.
    """

    out: Path = Path("demo-output")
    data: Path = Path("data-cache/small")
    owners: int = 6
    joined: int = 2
    arch: str = "conv4"
    zoo_epochs: int = 10
    preset: dict[str, Any] = field(
        default_factory=lambda: {
            "base": "smoke",
            "steps": 60,
            "warmup_steps": 3,
            "teachers_per_step": 2,
            "min_teachers": 2,
            "checkpoint_every": 20,
        }
    )
    shots: int = 5
    owner_episodes: int = 10
    eval_classes: int = 40
    eval_episodes: int = 50
    eval_shots: tuple[int, ...] = (1, 5)
    round_timeout_s: float = 900.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.owners < 2:
            raise ConfigError("--owners must be at least 2 (a round needs two teachers)")
        if not 0 <= self.joined < self.owners:
            raise ConfigError(
                "--joined must be below --owners: one owner who did not join fetches instead"
            )


@dataclass(frozen=True)
class _Paths:
    out: Path

    @property
    def home(self) -> Path:
        return self.out / "home"

    @property
    def zoo(self) -> Path:
        return self.out / "zoo"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def meta_test(self) -> Path:
        return self.out / "meta-test"

    def owner(self, name: str) -> Path:
        return self.out / "owners" / name


class _Demo:
    """One run of the story; `run` returns the summary."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.paths = _Paths(config.out)
        self.procs = Processes(self.paths.logs, _ENV)
        self.clock = time.monotonic()
        self.phases: dict[str, float] = {}
        self.names = [f"owner-{i}" for i in range(1, config.owners + 1)]
        self.joined = self.names[: config.joined]
        self.fetcher = self.names[-1]
        self.ports: dict[str, int] = {}
        self.server: Background | None = None
        self.summary: dict[str, Any] = {"config": _jsonable(asdict(config))}

    # -- plumbing --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.clock
        out_console.print(
            f"[{elapsed:6.1f} s] {text}", markup=False, highlight=False, soft_wrap=True
        )

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.phases[name] = round(time.monotonic() - started, 1)

    def json_of(self, name: str, argv: list[str], *, check: bool = True) -> Any:
        result = self.procs.run(name, argv, check=check)
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise DemoError(
                f"{name} printed no JSON; log: {self.paths.logs / (name + '.log')}"
            ) from None

    def exchange(self) -> list[str]:
        home = self.paths.home
        return [
            "--server",
            f"127.0.0.1:{self.ports['exchange']}",
            "--ca",
            str(home / "ca.pem"),
            "--server-pub",
            str(home / "server.pub"),
        ]

    # -- the story -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        for name in _OWNED:
            target = self.config.out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        self.paths.logs.mkdir(parents=True)
        try:
            with self.phase("data"):
                self.build_data()
            with self.phase("zoo"):
                teachers = self.train_zoo()
            with self.phase("set-up"):
                self.set_up_server(teachers[0])
                self.enroll_owners()
            with self.phase("start"):
                self.start()
            with self.phase("submit"):
                self.submit_all(teachers)
            with self.phase("round"):
                self.wait_for_round()
            with self.phase("owners"):
                self.fetch_and_finetune()
                self.check_joined()
            with self.phase("meta-test"):
                self.meta_test()
            self.summary["status"] = self.json_of("status", self.server_cmd("status", "--json"))
        finally:
            self.stop()
        self.phases["total"] = round(time.monotonic() - self.clock, 1)
        self.summary["phases"] = self.phases
        self.summary["seconds"] = self.phases["total"]
        return self.summary

    def bench(self, *args: str) -> list[str]:
        return [command_path("free-bench"), *args]

    def client(self, *args: str) -> list[str]:
        return [command_path("free-client"), *args]

    def server_cmd(self, *args: str) -> list[str]:
        return [command_path("free-server"), *args, "--home", str(self.paths.home)]

    def build_data(self) -> None:
        data = str(self.config.data)
        self.procs.run("data-build", self.bench("data", "build", "--size", "small", "--out", data))

        def show(split: str) -> None:
            picture = self.config.out / f"episode-{split}.png"
            self.procs.run(
                f"data-show-{split}",
                self.bench(
                    "data", "show", data, "--split", split, "--ways", "5", "--shots", "1",
                    "--queries", "2", "--out", str(picture),
                ),
            )  # fmt: skip

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(show, ("meta-train", "meta-test")))
        self.say(f"glyph set ready in {data}; episode pictures in {self.config.out}")

    def train_zoo(self) -> list[Path]:
        config = self.config
        self.say(f"training {config.owners} owners' {config.arch} classifiers (free-bench zoo)")
        self.procs.run(
            "zoo",
            self.bench(
                "zoo", "--data", str(config.data), "--models", str(config.owners),
                "--arch", config.arch, "--epochs", str(config.zoo_epochs),
                "--seed", str(config.seed), "--out", str(self.paths.zoo),
            ),
        )  # fmt: skip
        teachers = sorted(self.paths.zoo.glob("*.onnx"))
        if len(teachers) != config.owners:
            raise DemoError(f"free-bench zoo wrote {len(teachers)} models, not {config.owners}")
        return teachers

    def set_up_server(self, first_teacher: Path) -> None:
        home = self.paths.home
        self.procs.run("server-init", self.server_cmd("init"))
        self.ports = dict(zip(("exchange", "flower", "superlink"), free_ports(3), strict=True))
        self.summary["ports"] = self.ports
        configure_home(
            home / "config.toml",
            listen="127.0.0.1",
            superlink_port=self.ports["superlink"],
            preset="demo",
            min_models=self.config.owners,
        )
        record = json.loads(first_teacher.with_suffix(".json").read_text(encoding="utf-8"))
        channels, side, _ = record["task"]["input_shape"]
        preset = dict(self.config.preset)
        shape = {"channels": channels, "image_size": side}
        preset["learner"] = {**preset.get("learner", {}), **shape}
        preset["generator"] = {**preset.get("generator", {}), **shape}
        (home / "presets").mkdir(exist_ok=True)
        (home / "presets" / "demo.json").write_text(json.dumps(preset, indent=2) + "\n")
        self.summary["preset"] = preset
        self.say(f"server home {home} (preset demo: {preset['steps']} steps, {channels}x{side}px)")

    def enroll_owners(self) -> None:
        config = self.config

        def enroll(index: int) -> None:
            name = self.names[index]
            folder = self.paths.owner(name)
            self.procs.run(f"keygen-{name}", self.client("keygen", "--out", str(folder)))
            self.procs.run(
                f"clients-add-{name}",
                self.server_cmd(
                    "clients", "add", name, str(folder / "client.pub"),
                    "--node-pub", str(folder / "node.pub"),
                ),
            )  # fmt: skip
            if name in self.joined or name == self.fetcher:
                self.export_folders(
                    f"data-{name}", folder / "data", classes=5, seed=config.seed * 1000 + index + 1
                )

        # Two at a time: most of each command's time is starting Python and its imports.
        with ThreadPoolExecutor(max_workers=2) as pool:
            meta_test = pool.submit(
                self.export_folders,
                "data-meta-test",
                self.paths.meta_test,
                classes=config.eval_classes,
                seed=config.seed * 1000 + 999,
            )
            list(pool.map(enroll, range(len(self.names))))
            meta_test.result()
        self.say(
            f"{len(self.names)} owners made their keys and were enrolled; owners"
            f" {', '.join([*self.joined, self.fetcher])} got 5 new (meta-test) classes each"
        )

    def export_folders(self, name: str, out: Path, *, classes: int, seed: int) -> None:
        self.procs.run(
            name,
            self.bench(
                "data", "export-folders", str(self.config.data), "--split", "meta-test",
                "--classes", str(classes), "--per-class", "20", "--seed", str(seed),
                "--out", str(out),
            ),
        )  # fmt: skip

    def start(self) -> None:
        home, ports = self.paths.home, self.ports
        self.server = self.procs.start(
            "server",
            self.server_cmd(
                "start", "--port", str(ports["exchange"]), "--flower-port", str(ports["flower"]),
                "--min-models", str(self.config.owners),
            ),
        )  # fmt: skip
        self.server.wait_for("stop with Ctrl-C or SIGTERM", 180.0)
        self.say(
            f"free-server serving: exchange 127.0.0.1:{ports['exchange']}, Flower front"
            f" 127.0.0.1:{ports['flower']}"
        )
        joins = []
        for name in self.joined:
            folder = self.paths.owner(name)
            joins.append(
                self.procs.start(
                    f"join-{name}",
                    self.client(
                        "join", "--superlink", f"127.0.0.1:{ports['flower']}",
                        "--key", str(folder), "--ca", str(home / "ca.pem"),
                        "--server-pub", str(home / "server.pub"), "--data", str(folder / "data"),
                        "--shots", str(self.config.shots),
                        "--episodes", str(self.config.owner_episodes),
                    ),
                )
            )  # fmt: skip
        for join in joins:
            join.wait_for("SuperNode ID", 120.0)
        if joins:
            self.say(f"{', '.join(self.joined)} joined as Flower SuperNodes")

    def submit_all(self, teachers: list[Path]) -> None:
        def submit(pair: tuple[str, Path]) -> dict[str, Any]:
            name, model = pair
            folder = self.paths.owner(name)
            report: dict[str, Any] = self.json_of(
                f"submit-{name}",
                self.client(
                    "submit", str(model), "--key", str(folder / "client.key"), *self.exchange(),
                    "--json",
                ),
            )  # fmt: skip
            return report

        self.say(f"{len(teachers)} owners submit their models (signed, streamed, verdict awaited)")
        # Two at a time: each runs local intake (torch, onnxruntime) before its upload.
        with ThreadPoolExecutor(max_workers=2) as pool:
            reports = list(pool.map(submit, zip(self.names, teachers, strict=True)))
        owners = []
        for name, model, report in zip(self.names, teachers, reports, strict=True):
            owners.append(
                {
                    "name": name,
                    "model": model.name,
                    "submission_id": report["submission_id"],
                    "receipt_verified": report["receipt_verified"],
                    "receipt_server_key_id": report["receipt"]["server_key_id"],
                    "verdict": (report["verdict"] or {}).get("state"),
                    "joined": name in self.joined,
                }
            )
        self.summary["owners"] = owners
        accepted = sum(1 for o in owners if o["verdict"] == "accepted")
        self.say(f"{accepted} of {len(owners)} models accepted; the round starts by itself")

    def wait_for_round(self) -> None:
        deadline = time.monotonic() + self.config.round_timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.server is not None
            if self.server.process.poll() is not None:
                raise DemoError(f"free-server stopped during the round; log: {self.server.log}")
            status = self.json_of("status-poll", self.server_cmd("status", "--json"))
            ended = [r for r in status["rounds"] if r["state"] in ("finished", "failed")]
            if ended and ended[-1]["state"] == "failed":
                raise DemoError(
                    f"meta round {ended[-1]['id']} failed: {ended[-1]['error']};"
                    f" logs in {self.paths.home / 'flower'}"
                )
            if ended and status["releases"]:
                break
            time.sleep(3.0)
        else:
            raise DemoError(
                f"no meta round finished within {self.config.round_timeout_s:.0f} s; logs in"
                f" {self.paths.home / 'flower'}"
            )
        round_row = [r for r in status["rounds"] if r["state"] == "finished"][-1]
        release = status["releases"][-1]
        self.summary["round"] = round_row
        self.summary["release"] = release
        evaluations = [e for e in status["evaluations"] if e["round_id"] == round_row["id"]]
        self.say(
            f"round {round_row['id']} published release {release['version']} and pushed it:"
            f" {len(evaluations)} of {len(self.joined)} joined owners replied"
        )

    def fetch_and_finetune(self) -> None:
        name, shots = self.fetcher, str(self.config.shots)
        folder = self.paths.owner(name)
        fetched = self.json_of(
            "fetch",
            self.client(
                "fetch", "--key", str(folder / "client.key"), *self.exchange(), "--out",
                str(folder / "release"), "--json",
            ),
        )  # fmt: skip
        tuned = self.json_of(
            "finetune-export",
            self.client(
                "finetune", str(folder / "release"), "--data", str(folder / "data"),
                "--server-pub", str(self.paths.home / "server.pub"), "--shots", shots,
                "--episodes", str(self.config.owner_episodes),
                "--export", str(folder / "adapted.onnx"), "--json",
            ),
        )  # fmt: skip
        inspected = self.json_of(
            "inspect", self.client("inspect", str(folder / "adapted.onnx"), "--json"), check=False
        )
        self.summary["fetch"] = {"owner": name, "manifest": fetched}
        self.summary["finetune"] = {"owner": name, **tuned}
        self.summary["inspect"] = inspected
        score = tuned["score"]
        self.say(
            f"{name} fetched release {fetched['version']} (verified), fine-tuned it on its"
            f" tasks ({score['accuracy']:.1%}) and exported adapted.onnx:"
            f" inspect says {inspected['verdict']}"
        )
        if inspected["verdict"] != "accept":
            raise DemoError(f"free-client inspect refused the exported model: {inspected}")

    def check_joined(self) -> None:
        release = self.summary["fetch"]["manifest"]
        stored = []
        for name in self.joined:
            path = self.paths.owner(name) / "releases" / str(release["version"]) / "manifest.json"
            if not path.is_file():
                stored.append({"name": name, "stored": False})
                continue
            manifest = json.loads(path.read_text(encoding="utf-8"))["manifest"]
            stored.append(
                {
                    "name": name,
                    "stored": True,
                    "sha256": manifest["payload_sha256"],
                    "server_key_id": manifest["server_key_id"],
                    "matches_fetch": manifest["payload_sha256"] == release["payload_sha256"],
                }
            )
        self.summary["joined"] = stored

    def meta_test(self) -> None:
        release_dir = self.paths.owner(self.fetcher) / "release"
        config = self.config
        self.say(
            f"scoring the release and a random initialization on the same"
            f" {config.eval_episodes} meta-test tasks per shot count"
        )
        results = []
        for shots in config.eval_shots:
            common = [
                "finetune", str(release_dir), "--data", str(self.paths.meta_test),
                "--server-pub", str(self.paths.home / "server.pub"), "--shots", str(shots),
                "--episodes", str(config.eval_episodes), "--seed", str(config.seed),
                # The paper's protocol, as free-bench run reports it (free-bench adapt
                # compares the others).
                "--protocol", "paper", "--json",
            ]  # fmt: skip
            learned = self.json_of(f"meta-test-{shots}-shot-release", self.client(*common))
            random = self.json_of(
                f"meta-test-{shots}-shot-random", self.client(*common, "--random-init")
            )
            score = learned["score"]
            results.append(
                {
                    "ways": score["ways"],
                    "shots": score["shots"],
                    "queries": score["queries"],
                    "episodes": score["episodes"],
                    "release": {k: score[k] for k in ("accuracy", "ci95")},
                    "random_init": {k: random["score"][k] for k in ("accuracy", "ci95")},
                }
            )
        self.summary["meta_test"] = {"classes": config.eval_classes, "tasks": results}

    def stop(self) -> None:
        if self.procs.background:
            self.say("stopping the owners' SuperNodes and the server")
        self.procs.stop_all()


def configure_home(path: Path, **settings: str | int) -> None:
    """Set keys of a fresh home's config.toml, as an operator would edit it.

    Each name is a key that occurs once in the file (``listen``, ``preset``, ``workers``...).

    Raises
    ------
    DemoError
        A key is not in the file, or did not take the value.
    """
    text = path.read_text(encoding="utf-8")
    for key, value in settings.items():
        text = re.sub(rf"(?m)^{key}\s*=.*$", f"{key} = {json.dumps(value)}", text)
    path.write_text(text, encoding="utf-8")
    found = {
        key: value
        for table in tomllib.loads(text).values()
        if isinstance(table, dict)
        for key, value in table.items()
    }
    if any(found.get(key) != value for key, value in settings.items()):
        raise DemoError(f"could not set {', '.join(settings)} in {path}: it has other keys")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; return the summary (also written to ``OUT/summary.json``).

    Raises
    ------
    DemoError
        A step failed; every process it started has been stopped.
    """
    # Absolute paths for every command: the server's Flower processes run in folders of
    # their own and would read relative paths from there.
    config = dataclasses.replace(config, out=config.out.resolve(), data=config.data.resolve())
    config.out.mkdir(parents=True, exist_ok=True)
    summary = _Demo(config).run()
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _interrupt(signum: int, _frame: FrameType | None) -> NoReturn:
    # SIGTERM takes the same way out as Ctrl-C, so every started process is stopped.
    raise KeyboardInterrupt


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "demo-output"
    ),
    data: Annotated[Path, typer.Option(help="Where the small glyph set is built.")] = Path(
        "data-cache/small"
    ),
    owners: Annotated[int, typer.Option(min=2, help="Simulated data owners.")] = 6,
    joined: Annotated[int, typer.Option(min=0, help="Owners who join with their data.")] = 2,
    steps: Annotated[int, typer.Option(min=4, help="Steps of the demo's meta round.")] = 60,
    eval_episodes: Annotated[
        int, typer.Option(min=1, help="Meta-test tasks per shot count (1 and 5).")
    ] = 50,
) -> None:
    """Run the whole FREE-Fed story on loopback and print the result table."""
    base = DemoConfig()
    config = DemoConfig(
        out=out,
        data=data,
        owners=owners,
        joined=joined,
        preset={**base.preset, "steps": steps},
        eval_episodes=eval_episodes,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    summary = run_demo(config)
    print_report(summary)
    out_console.print(f"summary: {out / 'summary.json'}", markup=False, highlight=False)


def main() -> NoReturn:
    """Entry point of ``python -m free_common.bench.demo``."""
    run_app(app)


if __name__ == "__main__":
    sys.exit(main())
