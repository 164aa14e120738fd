"""Server homes holding finished meta rounds, for the console's tests.

`finished_round_home` builds one with the server's own parts: two owners, accepted
tiny teachers and one refused model in the store, then a round run the way the
ServerApp runs it (`free_server.rounds.run_meta_round` with the round's journal and
TensorBoard logger as the event callback, `publish_release`, the store's round rows
and an owner's evaluation reply), minus the push to SuperNodes; twice, so release 2
follows release 1. A third round is left running, with a journal of a few steps.
`console_token` makes a token the way the CLI does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flower_harness import (
    TEACHER_TASK,
    add_accepted_teachers,
    add_owner,
    flower_home,
    store_submission,
)
from onnx_builders import tiny_model

from free_common.engine import EngineEvent, Evaluated, RoundStarted, StepFinished
from free_common.engine.tensorboard import TensorBoardLogger
from free_common.security.keys import load_private_key
from free_server.console.auth import add_token
from free_server.home import ServerHome
from free_server.release import publish_release
from free_server.round_journal import JOURNAL_NAME, RoundJournal, round_dir
from free_server.rounds import run_meta_round
from free_server.server_app import TENSORBOARD_DIR
from free_server.store import Store

REFUSAL = "operator Loop is not on the intake allow-list: export the model without loops"


@dataclass(frozen=True)
class FinishedRound:
    home: ServerHome
    first_round_id: int
    round_id: int
    running_id: int
    release_version: int
    accepted: list[int]
    refused: int


def _refused_submission(home: ServerHome, owner_key: Path) -> int:
    data = tiny_model(99, classes=5, task=TEACHER_TASK).SerializeToString()
    with home.open_store() as store:
        submission_id = store_submission(store, load_private_key(owner_key), data)
        store.set_verdict(submission_id, accepted=False, reason=REFUSAL)
    return submission_id


def finished_round_home(root: Path, *, show_recovered: bool = True) -> FinishedRound:
    """A loopback home with two finished rounds (releases 1 and 2) and one running round."""
    home = flower_home(root / "home")
    text = home.config_path.read_text()
    text = text.replace("tensorboard = false", "tensorboard = true")
    if show_recovered:
        text = text.replace("show_recovered = false", "show_recovered = true")
    home.config_path.write_text(text)
    home = ServerHome.open(home.root)
    alice = add_owner(home, root, "alice")
    bob = add_owner(home, root, "bob")
    accepted = add_accepted_teachers(home, alice, [1, 2]) + add_accepted_teachers(home, bob, [3])
    refused = _refused_submission(home, bob.keys.client_key)
    with home.open_store() as store:
        first = _finished_round(home, store, evaluation=0.7)
        round_id = _finished_round(home, store, evaluation=0.8)
        running_id = store.request_round("tiny").id
        store.start_round(running_id)
    _running_journal(home, running_id)
    return FinishedRound(home, first, round_id, running_id, 2, accepted, refused)


def _finished_round(home: ServerHome, store: Store, *, evaluation: float) -> int:
    """Run one round as the ServerApp does (no push), publish it, record a reply."""
    round_id = store.request_round("tiny").id
    store.start_round(round_id)
    folder = round_dir(home.root, round_id)
    journal = RoundJournal(folder / JOURNAL_NAME)
    board = TensorBoardLogger(folder / TENSORBOARD_DIR)

    def on_event(event: EngineEvent) -> None:
        journal(event)
        board(event)

    output = run_meta_round(home, store, "tiny", on_event=on_event)
    journal.close()
    board.close()
    publish_release(store, output, load_private_key(home.signing_key), round_id=round_id)
    store.record_evaluation(
        round_id, "alice", {"version": 1, "stored": 1, "accuracy": evaluation, "ci95": 0.05}
    )
    store.finish_round(round_id)
    return round_id


def _running_journal(home: ServerHome, round_id: int) -> None:
    """A journal as a round two steps into four, scored on meta-val at each, leaves it."""
    journal = RoundJournal(round_dir(home.root, round_id) / JOURNAL_NAME)
    journal(RoundStarted(1, 4, 0, 1, 3, (), "cpu", False, True))
    for step, score in ((1, 0.5), (2, 0.625)):
        phase = "warmup" if step == 1 else "meta"
        journal(StepFinished(1, step, 4, phase, ("1", "2"), 0.5, 0.75, 0.25, 1.0, 1.5, 1, 2.0))
        journal(Evaluated(1, step, "meta-val", score, 0.05, 3, True))
    journal.close()


def console_token(home: ServerHome) -> str:
    return add_token(home.root)
