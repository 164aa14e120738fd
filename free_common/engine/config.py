"""Typed settings of one meta round, and the three presets: ``smoke``, ``cpu``, ``paper``.

``paper``
    The official FREE settings (`reference/free-brief.md`, a.5): generator nz 256 /
    ngf 64, k = 5 adaptation steps, 20 images per class, 4 teachers per step, 19
    warm-up steps, 999 steps, second-order MAML replay (10 tasks a batch, patience 10),
    400 images per pseudo-class, meta-val every 20 steps on 600 episodes. For a GPU.
``cpu``
    The same method sized for a 2-core CPU: a narrower generator (ngf 32), 10 images
    per class (16 for scratch inversion, one task's worth), replay capped at a few
    batches, 84 steps and smaller evaluations. Sized for `free-bench run --preset cpu`
    (every method, 24 Conv4 teachers) to end within 2 hours on 2 cores; on the mixed zoo
    of `benchmarks/zoo-mixed.toml` scratch inversion alone (ten-class ResNet teachers)
    takes over an hour on such a machine (`docs/engine-findings.md`).
``smoke``
    Tiny everything: the whole benchmark, every baseline included, in a few minutes.

Where our method departs from the official code on purpose (DESIGN.md section 4), the
presets take our side: KL terms on log-probabilities (``kl_form="log"``; ``"prob"`` is
the official form), every recovered teacher feeds the memory under the teacher's own
labels, selection on meta-val with step 0 a candidate, the learner's initial scale
chosen on meta-val and its scale-free norms pinned (`docs/engine-findings.md`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from free_common.errors import ConfigError
from free_common.inversion.config import FiveConfig, GeneratorConfig, ScratchConfig
from free_common.memory.config import MemoryConfig
from free_common.meta.config import BellConfig, EvalConfig, MamlConfig, ReplayConfig
from free_common.models.backbones import BACKBONES

__all__ = [
    "PRESETS",
    "EngineConfig",
    "LearnerSpec",
    "PresetName",
    "Recovery",
    "config_matches",
    "config_to_dict",
    "preset",
]

PresetName = Literal["smoke", "cpu", "paper"]
Recovery = Literal["five", "scratch"]
"""How a round recovers images: FIVE's meta-generator each step, or scratch inversion once."""


@dataclass(frozen=True)
class LearnerSpec:
    """The meta-learner: the server's choice of architecture and input format.

    Attributes
    ----------
    arch
        A registered backbone (`free_common.models.backbones.BACKBONES`).
    width
        Its base width; None takes the backbone's default (32 for conv4, as FREE).
    ways
        Classes per task, i.e. the head's outputs.
    channels, image_size
        Input the meta-learner reads: images in [0, 1], ``channels`` x S x S. The
        generator draws this format; teachers see it through their adapters.
    """

    arch: str = "conv4"
    width: int | None = None
    ways: int = 5
    channels: int = 3
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.arch not in BACKBONES:
            raise ConfigError(f"unknown architecture {self.arch!r}; use one of {list(BACKBONES)}")
        if self.ways < 2 or self.channels not in (1, 3) or self.image_size < 4:
            raise ConfigError("the learner needs ways >= 2, 1 or 3 channels, image_size >= 4")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one meta round does, with the parts of each layer below it.

    Attributes
    ----------
    preset
        Name of the preset this config started from (recorded, not read).
    learner, generator, five, scratch, bell, memory
        The meta-learner, the (meta-)generator, FIVE, scratch inversion, BELL and the
        memory bank. The generator's output must be the learner's input format.
    steps
        Meta-iterations of a round, warm-up included (the official ``epochs``, 999).
    warmup_steps
        First steps of a fresh meta-generator that adapt it only (no student, no
        memory, no meta-learner update): the official ``epoch < warmup``, 19.
    teachers_per_step
        Teachers drawn (uniformly, with replacement) per step: 4.
    min_teachers
        A round with fewer usable teachers stops with `TooFewTeachers`.
    recovery
        ``"five"`` (the method) or ``"scratch"`` (the baseline: every teacher inverted
        once from a fresh generator, then the same BELL training on those images).
    validation
        Meta-val episodes scored for model selection (only the episode shape and the
        count are read; the caller brings the episodes).
    validate_every
        Steps between meta-val evaluations after warm-up (the last step always is one).
    checkpoint_every
        Steps between checkpoints (the last step always is one).
    init_scales
        Candidate scales of the scale-free weights (`free_common.meta.norms`) of a fresh
        meta-learner. With meta-val episodes, a fresh round scores the seed's
        initialization at each scale before its first step and starts from the best;
        batch norm makes the scale invisible to the forward pass but not to
        fine-tuning. Without episodes (a data-free server) the first scale is used,
        so presets list first the scale the glyph benchmark's meta-val chose.
    continual
        A warm-started round draws only the teachers no earlier round learned from (when
        it has any), so the carried meta-generator adapts to the new models first and the
        earlier ones take part through the replay of the carried memory bank. Off, every
        round draws from all its teachers as a fresh one does.
    seed
        Seeds the learner's and the generator's initialization and every draw.
    """

    preset: str = "paper"
    learner: LearnerSpec = field(default_factory=LearnerSpec)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    five: FiveConfig = field(default_factory=FiveConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    bell: BellConfig = field(default_factory=BellConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    steps: int = 999
    warmup_steps: int = 19
    teachers_per_step: int = 4
    min_teachers: int = 4
    recovery: Recovery = "five"
    validation: EvalConfig = field(default_factory=lambda: EvalConfig(episodes=600))
    validate_every: int = 20
    checkpoint_every: int = 20
    init_scales: tuple[float, ...] = (1.0,)
    continual: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        learner, gen = self.learner, self.generator
        if (gen.channels, gen.image_size) != (learner.channels, learner.image_size):
            raise ConfigError(
                f"the generator draws {gen.channels}x{gen.image_size}px images but the learner "
                f"reads {learner.channels}x{learner.image_size}px: use EngineConfig.for_input"
            )
        ways = {learner.ways, self.bell.maml.ways, self.validation.ways}
        if len(ways) != 1:
            raise ConfigError(f"learner, replay and validation must agree on ways, got {ways}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError("warmup_steps must be at least 0 and below steps")
        if min(self.teachers_per_step, self.min_teachers, self.validate_every) < 1:
            raise ConfigError("teachers_per_step, min_teachers and validate_every must be >= 1")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be at least 1")
        if self.recovery not in ("five", "scratch"):
            raise ConfigError(f"recovery must be five or scratch, got {self.recovery!r}")
        if not self.init_scales or min(self.init_scales) <= 0:
            raise ConfigError("init_scales must list at least one positive scale")

    def for_input(self, channels: int, image_size: int) -> EngineConfig:
        """Return this config for another input format (learner and generator together)."""
        return dataclasses.replace(
            self,
            learner=dataclasses.replace(self.learner, channels=channels, image_size=image_size),
            generator=dataclasses.replace(self.generator, channels=channels, image_size=image_size),
        )

    def with_iga(self, use_iga: bool) -> EngineConfig:
        """Return this config with BELL's implicit gradient alignment on or off."""
        return dataclasses.replace(self, bell=dataclasses.replace(self.bell, use_iga=use_iga))

    def with_recovery(self, recovery: Recovery) -> EngineConfig:
        """Return this config recovering by FIVE or by scratch inversion."""
        return dataclasses.replace(self, recovery=recovery)

    def distillation_only(self) -> EngineConfig:
        """Return this config distilling the teachers (summed gradients) with no MAML replay."""
        bell = dataclasses.replace(self.bell, use_iga=False, replay_enabled=False)
        return dataclasses.replace(self, bell=bell)


def config_to_dict(config: EngineConfig) -> dict[str, Any]:
    """JSON-able form of `config` (tuples become lists); recorded in checkpoints and manifests."""
    data: dict[str, Any] = _lists(dataclasses.asdict(config))
    return data


def config_matches(saved: dict[str, Any], config: EngineConfig) -> bool:
    """Tell whether a checkpoint's recorded config is `config`.

    A setting added after the checkpoint was written matches when `config` holds it at
    its default (the code then computes what the old code did).
    """
    return _matches(saved, config_to_dict(config), config_to_dict(EngineConfig()))


def _matches(saved: Any, current: Any, default: Any) -> bool:
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return bool(saved == current)
    if set(saved) - set(current):
        return False
    defaults = default if isinstance(default, dict) else {}
    for key, value in current.items():
        if key in saved:
            if not _matches(saved[key], value, defaults.get(key)):
                return False
        elif key not in defaults or value != defaults[key]:
            return False
    return True


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(item) for item in value]
    return value


# Scale-free weights of a fresh learner are tried at these scales on meta-val (step 0),
# led by x0.2, the glyph benchmark's meta-val choice: a round without meta-val episodes
# (a data-free server) starts there.
_INIT_SCALES = (0.2, 1.0, 0.5, 0.3, 0.1)


def _paper() -> EngineConfig:
    return EngineConfig(preset="paper", bell=BellConfig(pin_norms=True), init_scales=_INIT_SCALES)


def _cpu() -> EngineConfig:
    return EngineConfig(
        preset="cpu",
        generator=GeneratorConfig(width=32),
        five=FiveConfig(images_per_class=10),
        # A replayed task needs shots + queries = 16 images of a class; scratch inverts
        # each teacher once, so it recovers 16 (FIVE's memory fills over repeated draws).
        scratch=ScratchConfig(images_per_class=16),
        bell=BellConfig(
            replay=ReplayConfig(episode_batch=5, patience=3, max_batches=6), pin_norms=True
        ),
        init_scales=_INIT_SCALES,
        memory=MemoryConfig(capacity_per_class=100),
        steps=84,
        warmup_steps=6,
        validation=EvalConfig(episodes=100),
        validate_every=13,
        checkpoint_every=10,
    )


def _smoke() -> EngineConfig:
    images_per_class = 5
    return EngineConfig(
        preset="smoke",
        generator=GeneratorConfig(width=16),
        five=FiveConfig(images_per_class=images_per_class),
        scratch=ScratchConfig(images_per_class=images_per_class),
        bell=BellConfig(
            maml=MamlConfig(queries=4),
            replay=ReplayConfig(episode_batch=2, patience=1, max_batches=2),
            pin_norms=True,
        ),
        init_scales=(0.3, 1.0),
        memory=MemoryConfig(capacity_per_class=20),
        steps=12,
        warmup_steps=3,
        teachers_per_step=2,
        min_teachers=2,
        validation=EvalConfig(episodes=20),
        validate_every=3,
        checkpoint_every=3,
    )


PRESETS = {"smoke": _smoke, "cpu": _cpu, "paper": _paper}


def preset(name: str) -> EngineConfig:
    """Return the named preset's config (``smoke``, ``cpu`` or ``paper``).

    Raises
    ------
    ConfigError
        Unknown preset name.
    """
    build = PRESETS.get(name)
    if build is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build()
