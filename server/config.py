"""The aggregator's settings: frozen dataclasses, stored as ``config.toml`` in the home.

`free-server init` writes the file with every setting spelled out, so an
operator sees what can be changed; `load_config` reads it back, refusing
unknown keys (a typo must not silently fall back to a default) and values of
the wrong type or range, each with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from free_common.errors import ConfigError
from free_common.screening import ScreeningConfig
from free_server.toml_text import TomlValue, dumps

__all__ = [
    "CONFIG_NAME",
    "ConsoleSettings",
    "IntakeSettings",
    "LimitSettings",
    "NetworkSettings",
    "PathSettings",
    "RoundSettings",
    "ServerConfig",
    "load_config",
    "write_config",
]

CONFIG_NAME = "config.toml"
_MIB = 1024 * 1024


@dataclass(frozen=True)
class NetworkSettings:
    """Where the server listens.

    Attributes
    ----------
    listen
        Address the exchange service and the Flower TLS front bind to.
    exchange_port
        The gRPC exchange service (submit, fetch).
    flower_port
        The TLS front that forwards only Flower's Fleet routes to the SuperLink.
    superlink_port
        The SuperLink itself, on loopback only (its Control API is unauthenticated).
    hosts
        The names and addresses in the server certificate, besides the loopback ones.
    mutual_tls
        Require owners to present a client certificate signed by the home's CA.
    """

    listen: str = "0.0.0.0"  # noqa: S104 (the exchange serves remote owners on purpose)
    exchange_port: int = 9091
    flower_port: int = 9092
    superlink_port: int = 9093
    hosts: tuple[str, ...] = ()
    mutual_tls: bool = False


@dataclass(frozen=True)
class RoundSettings:
    """When and how meta rounds run."""

    min_models: int = 3
    """A round starts once this many newly accepted models wait."""
    preset: str = "cpu"
    """Engine preset for rounds the scheduler starts."""
    tensorboard: bool = False
    """Write TensorBoard event files of each round to ``HOME/tensorboard/round-<id>/``."""


@dataclass(frozen=True)
class LimitSettings:
    """Caps on what owners may send, set on purpose rather than left to gRPC defaults."""

    max_upload_bytes: int = 64 * _MIB
    chunk_bytes: int = 1 * _MIB
    time_window_s: int = 300
    """How far a manifest's created-at time may be from the server's clock."""


@dataclass(frozen=True)
class IntakeSettings:
    """Bounds on the worker processes that run full intake on untrusted models."""

    workers: int = 1
    memory_mb: int = 2048
    timeout_s: int = 120
    screening: bool = False
    """Screen what intake accepts before it joins the pool (thresholds: ``[screening]``).

    Off by default: on the poisoned-pool benchmark its tests still hold or refuse honest
    models of architectures the meta-generator has not met (`benchmarks/results/poison`).
    """


@dataclass(frozen=True)
class ConsoleSettings:
    """The operator's read-only web console (served only with ``start --console-port``)."""

    listen: str = "127.0.0.1"
    """Address it binds to: loopback, so only this host's operator reaches it by default."""
    show_recovered: bool = False
    """Show the recovered images of the engine's memory bank. They are inverted from the
    owners' models and may reveal something of the owners' data (docs/security.md
    section 7): turn this on only where whoever holds a console token may see that."""


@dataclass(frozen=True)
class PathSettings:
    """Files of the home, relative to it (absolute paths are kept as they are)."""

    store: str = "store"
    ca_cert: str = "ca.pem"
    ca_key: str = "ca.key"
    tls_cert: str = "tls.pem"
    tls_key: str = "tls.key"
    signing_key: str = "server.key"
    signing_pub: str = "server.pub"


@dataclass(frozen=True)
class ServerConfig:
    """All settings of one server home, one attribute per ``[table]`` of the file."""

    network: NetworkSettings = field(default_factory=NetworkSettings)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)

    def __post_init__(self) -> None:
        for port_name in ("exchange_port", "flower_port", "superlink_port"):
            port = getattr(self.network, port_name)
            if not 1 <= port <= 65535:
                raise ConfigError(f"network.{port_name} = {port} is not a TCP port (1-65535)")
        ports = [self.network.exchange_port, self.network.flower_port, self.network.superlink_port]
        if len(set(ports)) != len(ports):
            raise ConfigError(
                "network.exchange_port, flower_port and superlink_port must all differ"
            )
        positive = {
            "rounds.min_models": self.rounds.min_models,
            "limits.max_upload_bytes": self.limits.max_upload_bytes,
            "limits.chunk_bytes": self.limits.chunk_bytes,
            "limits.time_window_s": self.limits.time_window_s,
            "intake.workers": self.intake.workers,
            "intake.memory_mb": self.intake.memory_mb,
            "intake.timeout_s": self.intake.timeout_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} = {value} must be positive")
        if self.limits.chunk_bytes > self.limits.max_upload_bytes:
            raise ConfigError("limits.chunk_bytes must not exceed limits.max_upload_bytes")


_HEADER = """FREE-Fed server settings, written by `free-server init`.
Paths are relative to this folder. Restart the server after editing."""


def write_config(path: Path, config: ServerConfig) -> None:
    """Write `config` as TOML to `path` (which must not exist yet)."""
    tables: dict[str, dict[str, TomlValue]] = {}
    for section in dataclasses.fields(config):
        values = dataclasses.asdict(getattr(config, section.name))
        tables[section.name] = {key: value for key, value in values.items()}
    with path.open("x", encoding="utf-8") as handle:
        handle.write(dumps(tables, header=_HEADER))
        handle.flush()
        os.fsync(handle.fileno())


def load_config(path: Path) -> ServerConfig:
    """Read a config file; every problem is a `ConfigError` naming the file and key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"no config file at {path}: run `free-server init` first") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    sections = {f.name: f for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}]")
    built: dict[str, Any] = {}
    for name, section_field in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {name} must be a table ([{name}])")
        section_type = typing.get_type_hints(ServerConfig)[section_field.name]
        built[name] = _section(path, name, section_type, table)
    try:
        return ServerConfig(**built)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from exc


def _section(path: Path, name: str, cls: type[Any], table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {name}.{unknown[0]}")
    values = {key: _typed(path, f"{name}.{key}", hints[key], value) for key, value in table.items()}
    return cls(**values)


def _typed(path: Path, key: str, expected: Any, value: Any) -> Any:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
    if not ok:
        wanted = getattr(expected, "__name__", "list of strings")
        raise ConfigError(f"{path}: {key} must be of type {wanted}, got {value!r}")
    return value
