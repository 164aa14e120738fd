"""The Flower ServerApp of a meta round (Message API).

The scheduler (`free_server.scheduler`) marks a round running in the store and
starts a Flower run of the round app with these run settings: ``home`` (the
server home), ``round-id``, ``preset``, ``reply-timeout-s`` and ``workers``. The
SuperLink starts ``flwr-serverapp``, which calls `main` here with a `Grid`. The
round:

1. `free_server.rounds.run_meta_round`: accepted submissions into the engine,
   in this process or, with ``workers`` above 1, on that many ranks started by
   torch's launcher (`free_server.round_ranks`);
2. `free_server.release.publish_release`: sign the result with the server key
   and record it in the store as the next release version (rank 0 does it for
   a round on ranks);
3. `push_release`: one ``evaluate`` message with the signed manifest and the
   weights (`free_common.flower_app.release_content`) to every online
   SuperNode, then collect replies until each node answered or the reply
   timeout passed. A node that fails, refuses or stays silent is logged and
   left out; it never fails the round;
4. each reply's metrics (the owner's fine-tuning accuracy) are recorded with
   `Store.record_evaluation`, under the owner's client name;
5. the round is finished in the store, or failed with the one-line reason when
   the engine or the publication could not go on.

The round's log is ``HOME/flower/rounds/round-<id>.log`` (Flower keeps the
ServerApp's own output for ``flwr log``). Its engine events also go to
``HOME/rounds/round-<id>/events.jsonl`` (`free_server.round_journal`, what the console
shows of a running round) and, with ``[rounds] tensorboard = true``, to TensorBoard
event files in ``HOME/rounds/round-<id>/tensorboard/`` (`free_common.engine.tensorboard`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from free_common.engine import (
    CheckpointSaved,
    EngineEvent,
    RoundFinished,
    RoundStarted,
    StepFinished,
)
from free_common.errors import FreeError, StoreError
from free_common.flower_app import METRIC_KEYS, METRICS_RECORD, release_content
from free_common.security.keys import load_private_key
from free_common.types import ReleaseManifest, Signed
from free_server.home import ServerHome
from free_server.release import publish_release
from free_server.round_journal import JOURNAL_NAME, RoundJournal, round_dir
from free_server.round_ranks import run_round_on_ranks
from free_server.rounds import run_meta_round
from free_server.store import Store
from free_server.superlink import SuperLinkPaths

__all__ = [
    "TENSORBOARD_DIR",
    "NodeReply",
    "PushOutcome",
    "RoundRunSettings",
    "app",
    "conduct_round",
    "push_release",
]

log = logging.getLogger("free_server.server_app")

_POLL_S = 1.0
_TTL_MARGIN_S = 60.0


@dataclass(frozen=True)
class RoundRunSettings:
    """The run settings a meta round's Flower run carries (set by the scheduler).

    Attributes
    ----------
    home
        The server home folder.
    round_id
        The store's round, already marked running.
    preset
        Engine preset name.
    reply_timeout_s
        How long to wait for the owners' replies after the push.
    workers
        Processes the engine runs on (1: this one).
    """

    home: Path
    round_id: int
    preset: str
    reply_timeout_s: float
    workers: int = 1

    @classmethod
    def from_run_config(cls, config: Mapping[str, object]) -> RoundRunSettings:
        """Read the settings from a run's config; `FreeError` when one is missing."""
        home, round_id = config.get("home"), config.get("round-id")
        preset, timeout = config.get("preset"), config.get("reply-timeout-s")
        if not isinstance(home, str) or not home:
            raise FreeError("the round's run has no server home: start rounds with free-server")
        if not isinstance(round_id, int) or round_id < 1:
            raise FreeError("the round's run has no round id: start rounds with free-server")
        if not isinstance(preset, str) or not preset:
            raise FreeError("the round's run has no preset")
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise FreeError("the round's run has no positive reply timeout")
        workers = config.get("workers", 1)
        if not isinstance(workers, int) or workers < 1:
            raise FreeError("the round's run asks for fewer than one worker process")
        return cls(Path(home), round_id, preset, float(timeout), workers)


@dataclass(frozen=True)
class NodeReply:
    """One owner's answer to a push."""

    node: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class PushOutcome:
    """What came back from one push.

    Attributes
    ----------
    replies
        Nodes that stored the release, with their metrics.
    errors
        Nodes that answered with an error (refused, crashed), by node name.
    missing
        Nodes that did not answer before the timeout.
    """

    replies: list[NodeReply] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """``N ok, N errors, N missing``."""
        return f"{len(self.replies)} ok, {len(self.errors)} errors, {len(self.missing)} missing"


def _reply_metrics(message: Message) -> dict[str, float]:
    """Return the owner's metrics: known keys with finite numbers only (owners' input)."""
    record = message.content.metric_records.get(METRICS_RECORD)
    if record is None:
        return {}
    out = {}
    for key in METRIC_KEYS:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                out[key] = number
    return out


def push_release(
    grid: Grid, signed: Signed[ReleaseManifest], weights: bytes, *, timeout_s: float
) -> PushOutcome:
    """Send a release to every online SuperNode and collect the replies for `timeout_s`."""
    nodes = {node.node_id: (node.name or str(node.node_id)) for node in grid.get_nodes()}
    outcome = PushOutcome()
    if not nodes:
        return outcome
    ttl = timeout_s + _TTL_MARGIN_S
    messages = [
        Message(
            release_content(signed, weights),
            dst_node_id=node_id,
            message_type=MessageType.EVALUATE,
            ttl=ttl,
            group_id=f"release-{signed.record.version}",
        )
        for node_id in nodes
    ]
    ids = list(grid.push_messages(messages))
    pending = {
        message_id: name for message_id, name in zip(ids, nodes.values(), strict=True) if message_id
    }
    for name in [n for m, n in zip(ids, nodes.values(), strict=True) if not m]:
        outcome.errors[name] = "the SuperLink did not accept the message"
    deadline = time.monotonic() + timeout_s
    while pending:
        for reply in grid.pull_messages(list(pending)):
            # Errors the SuperLink itself makes come from node 1, not the failed node.
            name = pending.pop(reply.metadata.reply_to_message_id, None)
            if name is None:
                continue
            if reply.has_error():
                outcome.errors[name] = f"code {reply.error.code}: {reply.error.reason}"
            else:
                outcome.replies.append(NodeReply(name, _reply_metrics(reply)))
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    outcome.missing.extend(pending.values())
    return outcome


def _progress_logger() -> Callable[[EngineEvent], None]:
    last = [0.0]

    def on_event(event: EngineEvent) -> None:
        if isinstance(event, RoundStarted):
            log.info(
                "engine round %d: %d steps from step %d, %d teachers on %s%s",
                event.round,
                event.steps,
                event.start_step,
                event.teachers,
                event.device,
                " (resumed)" if event.resumed else "",
            )
        elif isinstance(event, StepFinished):
            now = time.monotonic()
            if now - last[0] >= 10.0 or event.step == event.steps:
                last[0] = now
                log.info("engine step %d/%d (%s)", event.step, event.steps, event.phase)
        elif isinstance(event, CheckpointSaved):
            log.debug("checkpoint at step %d", event.step)
        elif isinstance(event, RoundFinished):
            log.info("engine round %d done in %.1f s", event.round, event.seconds)

    return on_event


TENSORBOARD_DIR = "tensorboard"
"""Folder of a round's TensorBoard event files, inside its `round_dir`."""


@contextmanager
def _round_events(home: ServerHome, round_id: int) -> Iterator[Callable[[EngineEvent], None]]:
    """Yield the round's event callback: the log, the journal and, when asked, TensorBoard."""
    folder = round_dir(home.root, round_id)
    journal = RoundJournal(folder / JOURNAL_NAME)
    sinks: list[Callable[[EngineEvent], None]] = [_progress_logger(), journal]
    board = None
    if home.config.rounds.tensorboard:
        # Loaded only when asked for: it pulls in the tensorboard package.
        from free_common.engine.tensorboard import TensorBoardLogger

        board = TensorBoardLogger(folder / TENSORBOARD_DIR)
        sinks.append(board)

    def on_event(event: EngineEvent) -> None:
        for sink in sinks:
            sink(event)

    try:
        yield on_event
    finally:
        journal.close()
        if board is not None:
            board.close()


def _finish(store: Store, round_id: int, error: str | None) -> None:
    try:
        store.finish_round(round_id, error)
    except StoreError as exc:
        # The scheduler may have ended it first (server shutdown).
        log.warning("round %d was not finished here: %s", round_id, exc)


def conduct_round(
    grid: Grid,
    home: ServerHome,
    store: Store,
    settings: RoundRunSettings,
) -> PushOutcome | None:
    """Run meta round `settings.round_id` end to end; see the module docstring.

    Returns
    -------
    PushOutcome or None
        What the owners answered; None when the round failed before the push.
    """
    round_id = settings.round_id
    current = store.round(round_id)
    if current.state != "running":
        log.warning("round %d is %s, not running: nothing to do", round_id, current.state)
        return None
    try:
        if settings.workers > 1:
            # The ranks are other processes: they write no journal or TensorBoard files.
            row, signed, weights = run_round_on_ranks(
                home, round_id, settings.preset, settings.workers
            )
        else:
            with _round_events(home, round_id) as on_event:
                output = run_meta_round(home, store, settings.preset, on_event=on_event)
            row, signed = publish_release(
                store, output, load_private_key(home.signing_key), round_id=round_id
            )
            weights = output.initialization.data
    except FreeError as exc:
        log.error("round %d failed: %s", round_id, exc.message)
        _finish(store, round_id, exc.message)
        return None
    log.info("round %d published release %d (%d bytes)", round_id, row.version, row.size)
    outcome = push_release(grid, signed, weights, timeout_s=settings.reply_timeout_s)
    for reply in outcome.replies:
        store.record_evaluation(round_id, reply.node, reply.metrics)
    for name, reason in outcome.errors.items():
        log.warning("round %d: %s answered with an error: %s", round_id, name, reason)
    for name in outcome.missing:
        log.warning(
            "round %d: %s did not answer within %.0f s", round_id, name, settings.reply_timeout_s
        )
    log.info("round %d pushed release %d: %s", round_id, row.version, outcome.describe())
    _finish(store, round_id, None)
    return outcome


app = ServerApp()


def main(grid: Grid, context: Context) -> None:
    """Entry point ``flwr-serverapp`` calls for each round's run."""
    settings = RoundRunSettings.from_run_config(context.run_config)
    home = ServerHome.open(settings.home)
    log_file = SuperLinkPaths.of(home).round_log(settings.round_id)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("free_server").addHandler(handler)
    logging.getLogger("free_server").setLevel(logging.INFO)
    with home.open_store() as store:
        conduct_round(grid, home, store, settings)


# Registered by call, not as a decorator: flwr ships no type information.
app.main()(main)
