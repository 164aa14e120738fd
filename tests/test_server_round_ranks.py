"""`free-server start --workers N`: the server's meta round on ranks started by torch's launcher.

Two homes hold the same accepted teachers; one runs the round in this process, the
other on 2 gloo ranks (`free_server.round_ranks`). Both must learn the same
initialization, and rank 0 must have published it as the round's release.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flower_harness import add_accepted_teachers, add_owner, flower_home

from free_common.errors import ConfigError, EngineError, FreeError
from free_common.security.keys import load_public_key
from free_common.security.signing import verify
from free_server.home import ServerHome
from free_server.round_ranks import run_round_on_ranks
from free_server.rounds import run_meta_round
from free_server.runtime import StartOptions
from free_server.server_app import RoundRunSettings

SEEDS = [11, 12, 13, 14]


def _home_with_teachers(root: Path) -> tuple[ServerHome, int]:
    home = flower_home(root / "home")
    add_accepted_teachers(home, add_owner(home, root, "owner-1"), SEEDS)
    with home.open_store() as store:
        round_id = store.start_round(store.request_round("tiny").id).id
    return home, round_id


@pytest.mark.slow
def test_two_gloo_ranks_publish_what_one_process_learns(tmp_path: Path) -> None:
    single, _ = _home_with_teachers(tmp_path / "single")
    with single.open_store() as store:
        expected = run_meta_round(single, store, "tiny").initialization.data

    ranked, round_id = _home_with_teachers(tmp_path / "ranked")
    row, signed, weights = run_round_on_ranks(ranked, round_id, "tiny", workers=2)

    # gloo sums the ranks' gradients in teacher order: the same bytes as one process.
    assert hashlib.sha256(weights).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert row.round_id == round_id and row.version == 1
    assert signed.record.payload_sha256 == hashlib.sha256(weights).hexdigest()
    verify(load_public_key(ranked.signing_pub), signed)


@pytest.mark.slow
def test_a_round_the_ranks_cannot_run_fails_with_rank_zeros_reason(tmp_path: Path) -> None:
    home, round_id = _home_with_teachers(tmp_path)
    with pytest.raises(EngineError, match=r"ranks failed .*unknown preset .no-such-preset."):
        run_round_on_ranks(home, round_id, "no-such-preset", workers=2)
    with home.open_store() as store:
        assert store.latest_release() is None


def test_the_run_settings_carry_the_worker_count() -> None:
    base = {"home": "/h", "round-id": 3, "preset": "tiny", "reply-timeout-s": 5.0}
    assert RoundRunSettings.from_run_config(base).workers == 1
    assert RoundRunSettings.from_run_config({**base, "workers": 2}).workers == 2
    with pytest.raises(FreeError, match="fewer than one worker"):
        RoundRunSettings.from_run_config({**base, "workers": 0})
    with pytest.raises(ConfigError, match="--workers 0"):
        StartOptions(workers=0)
