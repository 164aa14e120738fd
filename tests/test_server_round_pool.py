"""The server's round over its store: teachers listed from rows, converted when drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flower_harness import add_accepted_teachers, add_owner, flower_home

from free_common.errors import EngineError
from free_common.security.keys import load_private_key
from free_server import rounds
from free_server.release import publish_release


def test_listing_the_pool_reads_no_model(tmp_path: Path) -> None:
    home = flower_home(tmp_path / "home")
    ids = add_accepted_teachers(home, add_owner(home, tmp_path, "alice"), [1, 2, 3])
    with home.open_store() as store:
        rows = store.accepted_submissions()
        for row in rows:
            store.blob_path(row.sha256).unlink()  # listing must not need the bytes
        listed = rounds.accepted_teachers(home, store)
    by_content = sorted(rows, key=lambda row: row.sha256)
    assert [t.teacher_id for t in listed] == [str(row.id) for row in by_content]
    assert sorted(int(t.teacher_id) for t in listed) == sorted(ids)
    assert all(t.task.num_classes == 5 for t in listed)


def test_a_drawn_model_that_no_longer_loads_stops_the_round_naming_it(tmp_path: Path) -> None:
    home = flower_home(tmp_path / "home")
    add_accepted_teachers(home, add_owner(home, tmp_path, "alice"), [1, 2])
    with home.open_store() as store:
        for row in store.accepted_submissions():
            store.blob_path(row.sha256).write_bytes(b"not onnx any more")
        with pytest.raises(EngineError, match=r"accepted submission \d+ no longer loads"):
            rounds.run_meta_round(home, store, "tiny", device="cpu")


def test_a_round_learns_the_same_bytes_whatever_order_the_models_were_accepted_in(
    tmp_path: Path,
) -> None:
    # Owners submit concurrently, so arrival, ids and verdict order change from run to
    # run; the release must not.
    released = []
    for name, seeds in (("first", [1, 2, 3]), ("second", [3, 1, 2])):
        home = flower_home(tmp_path / name)
        add_accepted_teachers(home, add_owner(home, tmp_path / name, "alice"), seeds)
        with home.open_store() as store:
            output = rounds.run_meta_round(home, store, "tiny", device="cpu")
        released.append(output.initialization.data)
    assert released[0] == released[1]


def test_a_round_after_new_models_learns_from_them_and_says_what_it_has_seen(
    tmp_path: Path,
) -> None:
    home = flower_home(tmp_path / "home")
    owner = add_owner(home, tmp_path, "alice")
    early = add_accepted_teachers(home, owner, [1, 2])
    with home.open_store() as store:
        first = rounds.run_meta_round(home, store, "tiny", device="cpu")
    late = add_accepted_teachers(home, owner, [3, 4])
    with home.open_store() as store:
        round_id = store.request_round("tiny").id
        store.start_round(round_id)
        second = rounds.run_meta_round(home, store, "tiny", device="cpu")
        _row, signed = publish_release(
            store, second, load_private_key(home.signing_key), round_id=round_id
        )
    assert first.initialization.manifest["new_teacher_ids"] == sorted(map(str, early))
    manifest = second.initialization.manifest
    assert manifest["round"] == 2
    assert sorted(manifest["new_teacher_ids"]) == sorted(map(str, late))
    assert sorted(manifest["seen_teacher_ids"]) == sorted(map(str, early + late))
    # The signed release says it too.
    config = json.loads(signed.record.config_json)
    assert sorted(config["seen_teacher_ids"]) == sorted(map(str, early + late))
