"""A round's start: step 0 is a candidate, the scale is chosen on meta-val, norms stay pinned.

Also the two other defects the engine findings fixed: recovered images enter memory under
the teacher's own label, and the distillation baseline takes no replay step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import engine_tiny as tiny
import pytest
import torch

from free_common.engine import EngineEvent, Evaluated, RoundResult, StepFinished, run_round
from free_common.engine.checkpoint import read_checkpoint
from free_common.engine.config import EngineConfig
from free_common.engine.result import build_learner
from free_common.engine.teachers import TeacherPool
from free_common.errors import ConfigError
from free_common.meta.baselines import random_init
from free_common.meta.norms import scale_free_weights, weight_norms


def _run(
    workdir: Path, config: EngineConfig, validation: bool = True
) -> tuple[RoundResult, list[EngineEvent]]:
    events: list[EngineEvent] = []
    result = run_round(
        tiny.teachers(),
        config,
        workdir,
        validation=tiny.validation_episodes() if validation else None,
        device="cpu",
        on_event=events.append,
    )
    return result, events


def test_step_zero_is_scored_and_can_be_chosen(tmp_path: Path) -> None:
    # An outer step this large wrecks every state after the start.
    config = tiny.config(bell=dataclasses.replace(tiny.config().bell, outer_lr=3.0))
    result, events = _run(tmp_path, config)
    evals = [e for e in events if isinstance(e, Evaluated)]
    assert [e.step for e in evals] == [0, 4, 6]
    assert evals[0].mean > max(e.mean for e in evals[1:])
    assert result.selected_step == 0 and result.curve[0].step == 0
    start = random_init(lambda: build_learner(config.learner), config.seed).state_dict()
    chosen = result.initialization.build_model().state_dict()
    assert all(torch.equal(chosen[k], start[k]) for k in start)


def test_the_initial_scale_is_the_one_meta_val_scores_best(tmp_path: Path) -> None:
    config = tiny.pinned_config()
    result, _events = _run(tmp_path, config)
    scores = result.initialization.manifest["metrics"]["init_scale_scores"]
    assert set(scores) == {"1", "0.3"}
    best = max(scores, key=lambda s: scores[s])
    assert result.init_scale == float(best)
    # Step 0 is the rescaled start, scored once (its score is the chosen scale's).
    assert result.curve[0].mean == pytest.approx(scores[best])
    start = random_init(lambda: build_learner(config.learner), config.seed)
    names = scale_free_weights(start)
    expected = {n: v * result.init_scale for n, v in weight_norms(start, names).items()}
    assert weight_norms(result.learner, names) == pytest.approx(expected, rel=1e-5)


def test_without_validation_the_first_scale_is_taken(tmp_path: Path) -> None:
    config = dataclasses.replace(tiny.pinned_config(), init_scales=(0.5, 1.0))
    result = run_round(tiny.teachers(), config, tmp_path, device="cpu")
    assert result.init_scale == 0.5 and result.selected_step == config.steps


def test_unpinned_norms_drift_and_pinned_ones_do_not(tmp_path: Path) -> None:
    pinned, _ = _run(tmp_path / "pinned", tiny.pinned_config(init_scales=(1.0,)))
    loose, _ = _run(tmp_path / "loose", tiny.config())
    start = random_init(lambda: build_learner(tiny.config().learner), 7)
    names = scale_free_weights(start)
    before = weight_norms(start, names)
    assert weight_norms(pinned.learner, names) == pytest.approx(before, rel=1e-5)
    assert weight_norms(loose.learner, names) != pytest.approx(before, rel=1e-3)


def test_a_warm_started_round_keeps_its_scale_and_pins(tmp_path: Path) -> None:
    first, _events = _run(tmp_path, tiny.pinned_config())
    second, events = _run(tmp_path, tiny.pinned_config())
    assert second.round == 2 and second.init_scale == first.init_scale
    names = scale_free_weights(first.learner)
    assert weight_norms(second.learner, names) == pytest.approx(
        weight_norms(first.learner, names), rel=1e-5
    )
    # The carried state is round 2's step 0.
    assert next(e.step for e in events if isinstance(e, Evaluated)) == 0


def test_memory_holds_images_under_the_teachers_own_labels(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, tiny.config(), validation=False)
    # The old labels (the generation targets) disagree with the teacher this often:
    assert min(r.teacher_accuracy for r in result.recoveries) < 0.9
    saved = read_checkpoint(tmp_path)
    assert saved is not None
    tensors, record = saved
    pool = TeacherPool(tiny.teachers(), tiny.WAYS, 1, torch.device("cpu"))
    teachers = {pool.full(i).teacher_id: pool.full(i) for i in range(len(pool))}
    checked = 0
    for entry in record["memory"]:
        ((teacher_id, label),) = entry["sources"]
        images = tensors[entry["tensor"]].float()
        predicted = teachers[teacher_id](images).argmax(1)
        # float16 storage may move an image across a boundary; the labels were read before.
        assert (predicted == label).float().mean() >= 0.9
        checked += len(images)
    assert checked > 0


def test_distillation_alone_takes_no_replay_step(tmp_path: Path) -> None:
    result, events = _run(tmp_path, tiny.config().distillation_only())
    steps = [e for e in events if isinstance(e, StepFinished) and e.phase == "meta"]
    assert steps and all(e.replay_tasks == 0 and e.replay_loss is None for e in steps)
    assert all(e.distill_loss is not None for e in steps)
    assert result.initialization.manifest["method"] == "distill"


def test_init_scales_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="init_scales"):
        tiny.config(init_scales=())
    with pytest.raises(ConfigError, match="init_scales"):
        tiny.config(init_scales=(1.0, 0.0))


def test_relative_rates_step_scale_free_weights_at_lr_times_the_scale(tmp_path: Path) -> None:
    base = tiny.pinned_config(init_scales=(0.3,))
    config = dataclasses.replace(base, bell=dataclasses.replace(base.bell, relative_lr=True))
    _run(tmp_path, config)
    saved = read_checkpoint(tmp_path)
    assert saved is not None
    text = str(saved[1]["optimizer"])  # the packed Adam state: its groups in plain JSON
    assert "['scale_free', True]" in text and "['lr_scale', 0.3]" in text
    assert f"['lr', {1e-3 * 0.3!r}]" in text
    # A warm start rebuilds the same rates from the carried scale.
    second, _events = _run(tmp_path, config)
    assert second.round == 2 and second.init_scale == pytest.approx(0.3)


def test_relative_rates_group_the_scale_free_weights() -> None:
    from free_common.meta.bell import outer_optimizer, set_outer_lr
    from free_common.meta.config import BellConfig

    model = build_learner(tiny.config().learner)
    config = BellConfig(relative_lr=True)
    optimizer = outer_optimizer(model, config)
    set_outer_lr(optimizer, config, 0.2)
    free, rest = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in free["params"]] == scale_free_weights(model)
    assert free["lr"] == pytest.approx(2e-4) and rest["lr"] == pytest.approx(1e-3)
    assert (free["lr_scale"], rest["lr_scale"]) == (0.2, 1.0)
    plain = outer_optimizer(model, BellConfig())
    assert len(plain.param_groups) == 1
