"""What `free-client join` tells its ClientApp, through the SuperNode's node config.

The owner's settings reach the ClientApp as Flower's *node* config, which the
owner's own SuperNode reads from a TOML file (``--node-config FILE.toml``) and
which the aggregator never sees or sets. The run config, which comes from the
aggregator's run, is never read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from free_common.errors import ConfigError

__all__ = ["JoinSettings"]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class JoinSettings:
    """The owner's side of a joined SuperNode.

    Attributes
    ----------
    server_pub
        The pinned server key: only releases it signed are stored.
    releases_dir
        Where releases go: ``releases_dir/<version>/meta.safetensors`` and
        ``manifest.json``.
    data_dir
        Local data to fine-tune each release on (class folders); None to only store.
    shots, queries, episodes
        Few-shot episodes drawn from the local data per release.
    steps, lr
        Fine-tuning steps and learning rate per episode (the paper's 10 and 0.01).
    seed
        Seeds the episode draws, so two releases are scored on the same tasks.
    """

    server_pub: Path
    releases_dir: Path
    data_dir: Path | None = None
    shots: int = 5
    queries: int = 15
    episodes: int = 20
    steps: int = 10
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.shots, self.queries, self.episodes, self.steps) < 1:
            raise ConfigError("shots, queries, episodes and steps must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"the fine-tuning learning rate must be positive, got {self.lr}")

    def to_toml(self) -> str:
        """Return the node-config file's text."""
        lines = [
            f"server-pub = {_quote(str(self.server_pub))}",
            f"releases-dir = {_quote(str(self.releases_dir))}",
            f"data-dir = {_quote('' if self.data_dir is None else str(self.data_dir))}",
            f"shots = {self.shots}",
            f"queries = {self.queries}",
            f"episodes = {self.episodes}",
            f"steps = {self.steps}",
            f"lr = {self.lr!r}",
            f"seed = {self.seed}",
        ]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_node_config(cls, config: Mapping[str, object]) -> JoinSettings:
        """Read the settings back from the ClientApp's ``context.node_config``.

        Raises
        ------
        ConfigError
            A setting is missing or of the wrong type (a SuperNode not started by join).
        """

        def text(key: str) -> str:
            value = config.get(key)
            if not isinstance(value, str):
                raise ConfigError(
                    f"node config {key!r} is missing: start the SuperNode with `free-client join`"
                )
            return value

        def number(key: str, kind: type[int] | type[float]) -> int | float:
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"node config {key!r} must be a number")
            return kind(value)

        data = text("data-dir")
        return cls(
            server_pub=Path(text("server-pub")),
            releases_dir=Path(text("releases-dir")),
            data_dir=Path(data) if data else None,
            shots=int(number("shots", int)),
            queries=int(number("queries", int)),
            episodes=int(number("episodes", int)),
            steps=int(number("steps", int)),
            lr=float(number("lr", float)),
            seed=int(number("seed", int)),
        )
