"""The training state of a round, and its round trip through a checkpoint.

Everything that decides what the next step does is here, so a resumed round takes
exactly the steps an uninterrupted one would: the meta-learner and its Adam moments,
the meta-generator (and its optimizer when persistent), the memory bank's images in
FIFO order, the one random generator every draw comes from, the meta-val selector,
and for the scratch baseline the images recovered before training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from free_common.engine.checkpoint import pack, unpack
from free_common.engine.config import EngineConfig
from free_common.engine.result import EvalPoint, RecoveryRecord, build_learner
from free_common.errors import CheckpointError
from free_common.inversion.five import MetaGenerator, Recovery
from free_common.inversion.generator import build_generator
from free_common.memory.bank import MemoryBank
from free_common.meta.baselines import random_init
from free_common.meta.bell import outer_optimizer, set_outer_lr
from free_common.meta.evaluate import EvalResult
from free_common.meta.selection import ValidationSelector
from free_common.models.backbones import Backbone

__all__ = ["TrainingState", "carry_state", "new_state", "restore_state", "state_record"]

_NAME_PREFIX = "name:"


@dataclass
class TrainingState:
    """Mutable state of one round in progress.

    Attributes
    ----------
    round, step, warmup
        Round number, steps done, warm-up steps of this round (0 once the
        meta-generator has been warmed up in an earlier round).
    learner, optimizer
        The meta-learner and its main Adam (shared by distillation and replay).
    meta_generator
        FIVE's meta-generator.
    memory
        The task memory bank.
    rng
        The CPU generator every random draw of the round comes from.
    selector
        Best meta-val state so far.
    curve, recoveries
        Meta-val evaluations and recoveries so far.
    scratch
        Scratch baseline: the images recovered before training, by teacher id.
    seconds
        Wall time spent, summed over resumptions.
    init_scale
        The scale the fresh meta-learner's scale-free weights started at.
    pinned
        The norms those weights are kept at (empty: not pinned), by parameter name.
    scale_scores
        Meta-val accuracy of each candidate scale (a fresh round with validation only).
    started
        The round's start is done: scale chosen, norms pinned, step 0 scored.
    seen
        Ids of the teachers earlier rounds learned from (carried from round to round):
        what a continual round (`EngineConfig.continual`) leaves to the memory bank.
    carried_release
        A warm round's start: the meta-learner state the last round handed back, for
        step 0 to score (None once the start is done, and in a fresh round).
    """

    round: int
    step: int
    warmup: int
    learner: Backbone
    optimizer: torch.optim.Adam
    meta_generator: MetaGenerator
    memory: MemoryBank
    rng: torch.Generator
    selector: ValidationSelector = field(default_factory=ValidationSelector)
    curve: list[EvalPoint] = field(default_factory=list)
    recoveries: list[RecoveryRecord] = field(default_factory=list)
    scratch: dict[str, Recovery] = field(default_factory=dict)
    seconds: float = 0.0
    init_scale: float = 1.0
    pinned: dict[str, float] = field(default_factory=dict)
    scale_scores: dict[str, float] = field(default_factory=dict)
    started: bool = False
    seen: tuple[str, ...] = ()
    carried_release: dict[str, Tensor] | None = None


def round_rng(config: EngineConfig, round_index: int) -> torch.Generator:
    """Return the random generator of a round, seeded by the config's seed and the round number."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + round_index)


def new_state(config: EngineConfig, device: torch.device) -> TrainingState:
    """Start fresh: round 1, new meta-learner, meta-generator and memory, all from the seed."""
    learner = random_init(lambda: build_learner(config.learner), config.seed).to(device)
    generator = build_generator(config.generator, config.seed + 1, device)
    spec = config.learner
    return TrainingState(
        round=1,
        step=0,
        warmup=config.warmup_steps,
        learner=learner,
        optimizer=outer_optimizer(learner, config.bell),
        meta_generator=MetaGenerator(generator, config.five),
        memory=MemoryBank((spec.channels, spec.image_size, spec.image_size), config.memory),
        rng=round_rng(config, 1),
    )


def state_record(state: TrainingState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON record of `state` (see `free_common.engine.checkpoint`)."""
    tensors: dict[str, Tensor] = {}
    selector = state.selector
    record: dict[str, Any] = {
        "round": state.round,
        "step": state.step,
        "warmup": state.warmup,
        "seconds": state.seconds,
        "init_scale": state.init_scale,
        "pinned": dict(state.pinned),
        "scale_scores": dict(state.scale_scores),
        "started": state.started,
        "seen": list(state.seen),
        "carried_release": pack(state.carried_release, "carried_release", tensors),
        "learner": pack(state.learner.state_dict(), "learner", tensors),
        "optimizer": pack(state.optimizer.state_dict(), "optimizer", tensors),
        "generator": pack(state.meta_generator.state_dict(), "generator", tensors),
        "rng": pack(state.rng.get_state(), "rng", tensors),
        "memory": _pack_memory(state.memory, tensors),
        "selector": {
            "best": None if selector.best is None else dataclasses.asdict(selector.best),
            "step": selector.best_step,
            "state": pack(selector.state, "selector", tensors),
        },
        "curve": [dataclasses.asdict(point) for point in state.curve],
        "recoveries": [dataclasses.asdict(entry) for entry in state.recoveries],
        "scratch": [
            _pack_recovery(recovery, f"scratch.{i}", tensors)
            for i, recovery in enumerate(state.scratch.values())
        ],
    }
    return tensors, record


def restore_state(
    config: EngineConfig, device: torch.device, tensors: dict[str, Tensor], record: dict[str, Any]
) -> TrainingState:
    """Rebuild the state exactly as `state_record` saw it, to resume an unfinished round.

    Raises
    ------
    CheckpointError
        The record does not fit the config (another architecture, say).
    """
    state = carry_state(config, device, tensors, record)
    try:
        state.round, state.step = int(record["round"]), int(record["step"])
        state.warmup, state.seconds = int(record["warmup"]), float(record["seconds"])
        state.scale_scores = {str(k): float(v) for k, v in record.get("scale_scores", {}).items()}
        state.started = bool(record.get("started", state.step > 0))
        state.seen = tuple(str(t) for t in record.get("seen", ()))
        state.rng.set_state(unpack(record["rng"], tensors))
        saved = record["selector"]
        if saved["best"] is not None:
            state.selector.best = EvalResult(**saved["best"])
            state.selector.best_step = int(saved["step"])
            state.selector.state = unpack(saved["state"], tensors)
        state.curve = [EvalPoint(**point) for point in record["curve"]]
        state.recoveries = [RecoveryRecord(**entry) for entry in record["recoveries"]]
        scratch = [_unpack_recovery(entry, tensors, device) for entry in record["scratch"]]
        state.scratch = {r.teacher_id: r for r in scratch}
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint does not fit this round ({err})") from None
    return state


def carry_state(
    config: EngineConfig, device: torch.device, tensors: dict[str, Tensor], record: dict[str, Any]
) -> TrainingState:
    """Warm start: the next round begins from the saved meta-learner, generator and memory.

    Training goes on from the finished round's last state (a dip in meta-val is often
    passed through: a round that stopped at one would start every later round in it),
    while the state it handed back (its meta-val selection, the release) is kept as
    `TrainingState.carried_release`: step 0 of the new round scores it, so a round
    never hands back less than what was released. The round number goes up by one,
    steps start at 0 with no warm-up (the meta-generator is warmed up already), and
    the selector and curves start empty.
    """
    state = new_state(config, device)
    try:
        state.learner.load_state_dict(unpack(record["learner"], tensors))
        # Resuming an unfinished round reads the copy its start kept (None once done).
        release = (
            record.get("selector", {}).get("state")
            if record.get("finished")
            else record.get("carried_release")
        )
        state.carried_release = None if release is None else unpack(release, tensors)
        state.optimizer.load_state_dict(unpack(record["optimizer"], tensors))
        state.init_scale = float(record.get("init_scale", 1.0))
        set_outer_lr(state.optimizer, config.bell, state.init_scale)  # the new config wins
        state.meta_generator.load_state_dict(unpack(record["generator"], tensors))
        state.memory = _restore_memory(state.memory, record["memory"], tensors)
        state.round = int(record["round"]) + 1
        # Checkpoints from before pinning existed hold neither: unpinned, scale 1.
        state.pinned = {str(k): float(v) for k, v in record.get("pinned", {}).items()}
        # A finished round's own teachers join those it had seen already.
        state.seen = tuple(sorted({*record.get("seen", ()), *record.get("teacher_ids", ())}))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"the saved state does not fit this configuration ({str(err).splitlines()[0]:.200}); "
            "start over with fresh=True"
        ) from None
    state.warmup = 0
    state.rng = round_rng(config, state.round)
    return state


def _pack_memory(bank: MemoryBank, tensors: dict[str, Tensor]) -> list[dict[str, Any]]:
    entries = []
    dtype = getattr(torch, bank.config.dtype)
    for index, pseudo in enumerate(bank.classes):
        name = f"memory.{index}"
        # The bank stores this dtype already, so the round trip is exact.
        tensors[name] = bank.images(pseudo.key).to(dtype)
        entries.append(
            {"key": pseudo.key, "sources": [list(s) for s in pseudo.sources], "tensor": name}
        )
    return entries


def _restore_memory(
    empty: MemoryBank, entries: list[dict[str, Any]], tensors: dict[str, Tensor]
) -> MemoryBank:
    bank = MemoryBank(empty.image_shape, empty.config)
    for entry in entries:
        key = str(entry["key"])
        teacher, index = str(entry["sources"][0][0]), int(entry["sources"][0][1])
        # Re-adding under the first source gives the same key: its declared name, or the pair.
        names = [""] * index + [key[len(_NAME_PREFIX) :]] if key.startswith(_NAME_PREFIX) else []
        images = tensors[entry["tensor"]].to(torch.float32)
        bank.add(teacher, images, torch.full((len(images),), index), names)
        pseudo = bank.classes[-1]
        if pseudo.key != key:
            raise ValueError(f"memory class {key!r:.60} came back as {pseudo.key!r:.60}")
        pseudo.sources[:] = [(str(t), int(c)) for t, c in entry["sources"]]
    return bank


def _pack_recovery(recovery: Recovery, name: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    return {
        "teacher_id": recovery.teacher_id,
        "images": pack(recovery.images, f"{name}.images", tensors),
        "labels": pack(recovery.labels, f"{name}.labels", tensors),
        "losses": list(recovery.losses),
        "seconds": recovery.seconds,
        "teacher_accuracy": recovery.teacher_accuracy,
    }


def _unpack_recovery(
    entry: dict[str, Any], tensors: dict[str, Tensor], device: torch.device
) -> Recovery:
    return Recovery(
        teacher_id=str(entry["teacher_id"]),
        images=unpack(entry["images"], tensors).to(device),
        labels=unpack(entry["labels"], tensors).to(device),
        losses=tuple(float(v) for v in entry["losses"]),
        seconds=float(entry["seconds"]),
        teacher_accuracy=float(entry["teacher_accuracy"]),
    )
