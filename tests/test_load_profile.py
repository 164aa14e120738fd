"""The load benchmark's summary of where the exchange's threads spend their time."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from load_profile import thread_states  # benchmarks/ is no package: found by path

RUN = "Thread.run (threading.py:982)"
WAIT = "Future.result (concurrent/futures/_base.py:451);Condition.wait (threading.py:331)"
RECORD = "receive_submission (server/submission.py:190);Store.record_submission (store.py:630)"
SELECT = "BaseEventLoop._run_once (base_events.py:1898);EpollSelector.select (selectors.py:468)"
# Collapsed stacks as `py-spy record --idle --threads --format raw` writes them.
RAW = "\n".join(
    [
        f"thread (101): exchange-upload_0;{RUN};{WAIT} 6",
        f"thread (102): exchange-upload_1;{RUN};{RECORD} 3",
        f"thread (102): exchange-upload_1;{RUN};{WAIT} 1",
        f"thread (103): exchange-loop;{SELECT} 5",
        f"thread (104): Thread-1 (_poll_wrapper);{RUN} 2",
        "thread (0x7f00): 4",
    ]
)


def test_threads_are_grouped_by_name_and_their_states_shared_out(tmp_path: Path) -> None:
    raw = tmp_path / "threads.txt"
    raw.write_text(RAW)
    states = thread_states(raw)
    # Upload threads 0 and 1 are one group: 7 of their 10 samples wait for a chunk.
    assert list(states) == [
        "exchange-upload",
        "exchange-loop",
        "unnamed",
        "Thread-1 (_poll_wrapper)",
    ]
    shares = [(state, round(share, 6)) for state, share in states["exchange-upload"]]
    assert shares == [
        ("Future.result;Condition.wait", 0.7),
        ("receive_submission;Store.record_submission", 0.3),
    ]
    assert states["exchange-loop"] == [("BaseEventLoop._run_once;EpollSelector.select", 1.0)]
    assert states["unnamed"] == [("(no Python frame)", 1.0)]


def test_a_profile_recorded_without_threads_gives_no_groups(tmp_path: Path) -> None:
    raw = tmp_path / "gil.txt"
    raw.write_text(f"{RUN};Store._read (server/store.py:80) 9\n")
    assert thread_states(raw) == {}
