"""Checkpoints: resume after a stop or a kill ends where an uninterrupted round does; warm
start carries the state into the next round, fresh starts over; a NaN stops the round and
keeps the last good checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import engine_tiny as tiny
import pytest
import torch

from free_common.engine import (
    EngineConfig,
    EngineEvent,
    RoundResult,
    RoundStarted,
    StepFinished,
    run_round,
)
from free_common.engine.checkpoint import CHECKPOINT_FILE, pack, read_checkpoint, unpack
from free_common.engine.state import carry_state
from free_common.errors import CheckpointError, NonFiniteLoss

CPU = torch.device("cpu")
TESTS = Path(__file__).parent


class _Stop(Exception):
    """Stands in for a kill: raised from the progress callback."""


def _run(
    workdir: Path,
    config: EngineConfig | None = None,
    on_event: object = None,
    **kwargs: object,
) -> RoundResult:
    return run_round(
        tiny.teachers(),
        config or tiny.config(),
        workdir,
        validation=tiny.validation_episodes(),
        device="cpu",
        on_event=on_event,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def _stop_after(step: int) -> object:
    def on_event(event: EngineEvent) -> None:
        if isinstance(event, StepFinished) and event.step == step:
            raise _Stop

    return on_event


def _same_round(a: RoundResult, b: RoundResult) -> None:
    assert a.initialization.sha256 == b.initialization.sha256
    assert a.curve == b.curve and a.selected_step == b.selected_step
    strip = [(r.step, r.teacher_id, r.teacher_accuracy) for r in a.recoveries]
    assert strip == [(r.step, r.teacher_id, r.teacher_accuracy) for r in b.recoveries]
    final_a, final_b = a.learner.state_dict(), b.learner.state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    gen_a, gen_b = a.meta_generator.state_dict(), b.meta_generator.state_dict()
    assert all(torch.equal(v, gen_b["generator"][k]) for k, v in gen_a["generator"].items())


@pytest.mark.parametrize(("every", "resume_at"), [(1, 4), (3, 3)])
def test_resume_after_a_stop_equals_the_uninterrupted_round(
    tmp_path: Path, every: int, resume_at: int
) -> None:
    config = tiny.config(checkpoint_every=every)
    whole = _run(tmp_path / "whole", config)
    with pytest.raises(_Stop):
        _run(tmp_path / "cut", config, _stop_after(5))
    events: list[EngineEvent] = []
    resumed = _run(tmp_path / "cut", config, events.append)
    start = events[0]
    assert isinstance(start, RoundStarted) and start.resumed
    assert start.start_step == resume_at  # step 5 was never checkpointed
    _same_round(whole, resumed)


def test_resume_after_a_kill_equals_the_uninterrupted_round(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from pathlib import Path
        torch.set_num_threads(1)
        import engine_tiny as tiny
        from free_common.engine import StepFinished, run_round

        def on_event(event):
            if isinstance(event, StepFinished) and event.step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

        run_round(tiny.teachers(), tiny.config(), Path({str(tmp_path / "cut")!r}),
                  validation=tiny.validation_episodes(), device="cpu", on_event=on_event)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert killed.returncode == -9
    assert json.loads((tmp_path / "cut" / CHECKPOINT_FILE).read_text())["step"] == 3
    _same_round(_run(tmp_path / "whole"), _run(tmp_path / "cut"))


def test_scratch_round_resumes_without_recovering_again(tmp_path: Path) -> None:
    config = tiny.config(recovery="scratch")
    whole = _run(tmp_path / "whole", config)
    with pytest.raises(_Stop):
        _run(tmp_path / "cut", config, _stop_after(4))
    events: list[EngineEvent] = []
    resumed = _run(tmp_path / "cut", config, events.append)
    assert not [e for e in events if type(e).__name__ == "ScratchRecovered"]
    _same_round(whole, resumed)


def test_a_finished_round_carries_its_state_into_the_next(tmp_path: Path) -> None:
    first = _run(tmp_path)
    saved = read_checkpoint(tmp_path)
    assert saved is not None and saved[1]["finished"]
    carried = carry_state(tiny.config(), CPU, *saved)
    assert carried.round == 2 and carried.step == 0 and carried.warmup == 0
    # Training goes on from the last state; the release is kept for step 0 to score.
    final = first.learner.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in carried.learner.state_dict().items())
    released = first.initialization.build_model().state_dict()
    assert carried.carried_release is not None
    assert all(torch.equal(v, released[k]) for k, v in carried.carried_release.items())
    generator = first.meta_generator.generator.state_dict()
    assert all(
        torch.equal(v, generator[k])
        for k, v in carried.meta_generator.generator.state_dict().items()
    )
    saved_classes = saved[1]["memory"]
    assert [c.key for c in carried.memory.classes] == [e["key"] for e in saved_classes]
    assert len(carried.memory) == sum(len(saved[0][e["tensor"]]) for e in saved_classes) > 0
    assert carried.optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0

    events: list[EngineEvent] = []
    second = _run(tmp_path, on_event=events.append)
    start = events[0]
    assert isinstance(start, RoundStarted) and start.warm_start and start.warmup_steps == 0
    steps = [e for e in events if isinstance(e, StepFinished)]
    # No warm-up, and the carried memory can fill tasks from the first step on.
    assert {e.phase for e in steps} == {"meta"} and steps[0].replay_tasks > 0
    assert second.round == 2 and second.initialization.manifest["round"] == 2
    # It hands back nothing meta-val scores below the release it was offered at step 0.
    assert (
        second.initialization.manifest["metrics"]["meta_val"]["mean"]
        >= first.initialization.manifest["metrics"]["meta_val"]["mean"]
    )


def test_fresh_starts_over_from_the_seed(tmp_path: Path) -> None:
    first = _run(tmp_path)
    _run(tmp_path)  # round 2, warm
    again = _run(tmp_path, fresh=True)
    assert again.round == 1
    _same_round(first, again)


def test_an_unfinished_round_of_other_teachers_is_not_mixed_in(tmp_path: Path) -> None:
    with pytest.raises(_Stop):
        _run(tmp_path, on_event=_stop_after(3))
    with pytest.raises(CheckpointError, match="unfinished round 1 of other teachers"):
        run_round(tiny.teachers(4), tiny.config(), tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="other teachers or settings"):
        _run(tmp_path, dataclasses.replace(tiny.config(), seed=8))


def test_a_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(_Stop):
        _run(tmp_path, on_event=_stop_after(3))
    record = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    tensors = tmp_path / record["tensor_file"]
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        _run(tmp_path)


def test_a_nan_stops_the_round_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    teachers = tiny.teachers()

    def poison(event: EngineEvent) -> None:
        if isinstance(event, StepFinished) and event.step == 3:
            with torch.no_grad():
                for teacher in teachers:
                    teacher.module[1].weight.fill_(float("nan"))

    def run(on_event: object = None) -> RoundResult:
        return run_round(
            teachers,
            tiny.config(),
            tmp_path,
            device="cpu",
            on_event=on_event,  # type: ignore[arg-type]
        )

    with pytest.raises(NonFiniteLoss, match=r"step 4: the generator loss is nan.*\(step 3\)"):
        run(poison)
    record = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    assert record["step"] == 3 and not record["finished"]
    before = (tmp_path / record["tensor_file"]).read_bytes()
    saved = read_checkpoint(tmp_path)
    assert saved is not None
    tensors, _ = saved
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())
    # Resuming with the same poisoned teachers stops again and still keeps step 3.
    with pytest.raises(NonFiniteLoss):
        run()
    assert (tmp_path / record["tensor_file"]).read_bytes() == before


def test_pack_keeps_nested_state_with_typed_keys() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.5, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.loads(json.dumps(pack(optimizer.state_dict(), "opt", tensors)))
    restored = unpack(skeleton, tensors)
    assert set(restored["state"]) == {0, 1}
    assert torch.equal(
        restored["state"][1]["exp_avg"], optimizer.state_dict()["state"][1]["exp_avg"]
    )
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["lr"] == 0.01 and list(fresh.param_groups[0]["betas"]) == [
        0.5,
        0.9,
    ]


def test_a_finished_round_reads_back_as_the_same_result(tmp_path: Path) -> None:
    from free_common.engine import finished_round

    config = tiny.pinned_config()
    assert finished_round(tiny.teachers(), config, tmp_path, device="cpu") is None
    with pytest.raises(_Stop):
        _run(tmp_path, config, _stop_after(3))
    # Unfinished: nothing to read back.
    assert finished_round(tiny.teachers(), config, tmp_path, device="cpu") is None
    whole = _run(tmp_path, config)
    again = finished_round(tiny.teachers(), config, tmp_path, device="cpu")
    assert again is not None
    _same_round(whole, again)
    assert again.init_scale == whole.init_scale and again.seconds == whole.seconds
    # Other settings or other teachers: not this round.
    assert finished_round(tiny.teachers(), config.with_iga(False), tmp_path, device="cpu") is None
    assert finished_round(tiny.teachers(4), config, tmp_path, device="cpu") is None


def test_settings_added_later_match_at_their_defaults() -> None:
    from free_common.engine.config import config_matches, config_to_dict

    config = tiny.config()
    saved = config_to_dict(config)
    assert config_matches(saved, config)
    older = json.loads(json.dumps(saved))
    del older["bell"]["relative_lr"], older["five"]["bn_weight"], older["init_scales"]
    assert config_matches(older, config)
    # A new setting away from its default computes something else.
    bell = dataclasses.replace(config.bell, relative_lr=True)
    assert not config_matches(older, dataclasses.replace(config, bell=bell))
    assert not config_matches({**saved, "removed_setting": 1}, config)
    assert not config_matches(saved, config.with_iga(False))
