"""A meta round across processes (torch.distributed, gloo on loopback) computes what one
process computes, and a killed rank fails the launch with its checkpoint intact.

Every launch is the real thing: ``python -m torch.distributed.run --standalone`` starting
`distributed_round.py` on 2 ranks. Tolerance: sums over a step's teachers are taken in
teacher order on every rank (`free_common.engine.shard`), so the initialization is
expected bit for bit; the comparison still allows atol 1e-6 / rtol 1e-5 (a few float32
rounding steps on weights of order 1) so that a backend that reorders additions would
be judged by the numbers, not the bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from free_common.bench.launch import launcher_command
from free_common.engine.checkpoint import CHECKPOINT_FILE, read_checkpoint
from free_common.engine.distributed import Workers, current
from free_common.engine.shard import gather_in_order, sum_in_order, teacher_rngs

TESTS = Path(__file__).parent
SCRIPT = TESTS / "distributed_round.py"
ATOL, RTOL = 1e-6, 1e-5


def _launch(ranks: int, out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    one = [sys.executable, str(SCRIPT)]
    command = one if ranks == 1 else launcher_command(ranks, [str(SCRIPT)])
    return subprocess.run(
        [*command, str(out), str(work), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_close(a: Path, b: Path) -> None:
    first, second = load_tensors(a.read_bytes()), load_tensors(b.read_bytes())
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.allclose(tensor, second[key], atol=ATOL, rtol=RTOL), key


@pytest.mark.slow
def test_two_gloo_ranks_reach_the_single_process_initialization(tmp_path: Path) -> None:
    one = _launch(1, tmp_path / "one.safetensors", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch(2, tmp_path / "two.safetensors", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    _assert_close(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    # Only rank 0 wrote: one checkpoint, whose memory bank matches the single process's.
    saved_one, saved_two = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert saved_one is not None and saved_two is not None
    assert saved_one[1]["memory"] == saved_two[1]["memory"]
    assert len(list((tmp_path / "two").glob("state-*.safetensors"))) == 1


@pytest.mark.slow
def test_a_killed_rank_fails_the_launch_and_the_next_launch_resumes(tmp_path: Path) -> None:
    work = tmp_path / "cut"
    killed = _launch(2, tmp_path / "cut.safetensors", work, "--kill-at", "2")
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr
    assert not (tmp_path / "cut.safetensors").exists()
    # Rank 1 died after the step-2 checkpoint; rank 0 could write no later one.
    assert json.loads((work / CHECKPOINT_FILE).read_text())["step"] == 2
    assert read_checkpoint(work) is not None  # whole: its sha256 checks out
    resumed = _launch(2, tmp_path / "cut.safetensors", work)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _launch(2, tmp_path / "whole.safetensors", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    _assert_close(tmp_path / "whole.safetensors", tmp_path / "cut.safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU for each of 2 ranks")
def test_two_nccl_ranks_reach_the_single_process_initialization(tmp_path: Path) -> None:
    # On CUDA the kernels may sum in another order than the CPU's: compare CUDA with CUDA.
    one = _launch(1, tmp_path / "one.safetensors", tmp_path / "one", "--device", "cuda")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch(2, tmp_path / "two.safetensors", tmp_path / "two", "--device", "cuda")
    assert two.returncode == 0, two.stderr[-2000:]
    _assert_close(tmp_path / "one.safetensors", tmp_path / "two.safetensors")


def test_one_process_collectives_hand_back_their_input() -> None:
    workers = current()
    assert (workers.rank, workers.world, workers.is_main) == (0, 1, True)
    assert all(workers.owns(i) for i in range(3))
    rows = [[torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 0.25])]]
    total = sum_in_order(workers, 2, dict(enumerate(rows)), rows[0])
    assert total is not None and torch.equal(total[0], torch.tensor([1.5, 2.25]))
    assert gather_in_order(workers, 2, {0: "a", 1: "b"}, torch.device("cpu")) == ["a", "b"]
    assert workers.comm_seconds == 0.0


def test_each_teacher_draws_from_its_own_generator() -> None:
    rngs = teacher_rngs(3, torch.Generator().manual_seed(5))
    again = teacher_rngs(3, torch.Generator().manual_seed(5))
    first = [torch.rand(2, generator=g) for g in rngs]
    assert all(
        torch.equal(a, torch.rand(2, generator=g)) for a, g in zip(first, again, strict=True)
    )
    assert not torch.equal(first[0], first[1])


def test_round_robin_shares_a_step_out_over_ranks() -> None:
    ranks = [Workers(rank, 2) for rank in range(2)]
    assert [[i for i in range(5) if w.owns(i)] for w in ranks] == [[0, 2, 4], [1, 3]]
