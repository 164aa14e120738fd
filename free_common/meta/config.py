"""Typed settings of BELL and of evaluation, with the official FREE code's values as defaults.

Defaults are WalkerWorldPeace/FREE's (`main.py`, `scripts/mr.sh`); smaller presets that
finish on a 2-core CPU are the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from free_common.errors import ConfigError

__all__ = [
    "BellConfig",
    "EvalConfig",
    "IgaConfig",
    "InnerOptimizer",
    "KlForm",
    "MamlConfig",
    "ReplayConfig",
]

KlForm = Literal["log", "prob"]
"""KL on log-probabilities (``"log"``), or the official ``F.kl_div`` on probabilities (``"prob"``).

The same switch as `free_common.inversion.config.KlForm` (layer 3 packages do not import
each other).
"""

InnerOptimizer = Literal["adam", "sgd"]


@dataclass(frozen=True)
class IgaConfig:
    """Implicit gradient alignment: sequential per-teacher steps on a copy, then one outer step."""

    inner_lr: float = 1e-3  # the official copy's Adam runs at outer_lr
    inner_optimizer: InnerOptimizer = "adam"  # "sgd" is the setting of the analysis (and tests)
    # The outer step descends the pseudo-gradient scale * (theta - theta_tilde); 67 is the
    # official constant. Adam is nearly scale-free, so it matters through the shared state.
    pseudo_grad_scale: float = 67.0
    kl_form: KlForm = "log"  # the official code uses "prob"

    def __post_init__(self) -> None:
        if self.inner_lr <= 0 or self.pseudo_grad_scale <= 0:
            raise ConfigError("inner_lr and pseudo_grad_scale must be positive")


@dataclass(frozen=True)
class MamlConfig:
    """MAML on replayed tasks (training side)."""

    ways: int = 5  # way_train
    shots: int = 1  # num_sup_train (1 or 5 in the paper)
    queries: int = 15  # num_qur_train
    inner_steps: int = 5  # inner_update_num
    inner_lr: float = 0.01
    first_order: bool = False  # approx; the official default is second order

    def __post_init__(self) -> None:
        if min(self.ways, self.shots, self.queries, self.inner_steps) < 1:
            raise ConfigError("ways, shots, queries and inner_steps must be at least 1")


@dataclass(frozen=True)
class ReplayConfig:
    """When MAML replay stops: the patience rule of the official code."""

    episode_batch: int = 10  # tasks whose summed query losses make one outer step
    patience: int = 10  # generate_interval: stop after this many steps without a better accuracy
    max_batches: int | None = None  # a hard cap on outer steps per call (None: patience alone)

    def __post_init__(self) -> None:
        if self.episode_batch < 1 or self.patience < 1:
            raise ConfigError("episode_batch and patience must be at least 1")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError("max_batches must be at least 1 when set")


@dataclass(frozen=True)
class BellConfig:
    """BELL: the meta-learner's update on recovered tasks."""

    outer_lr: float = 1e-3  # the main Adam, shared by the distillation step and replay
    use_iga: bool = True  # False: FREE without iGA (summed per-teacher gradients)
    # False: distillation alone, no MAML replay (the baseline that shows what meta-learning adds)
    replay_enabled: bool = True
    # Keep the weights that batch norm makes scale-free at their starting norms
    # (`free_common.meta.norms`); the official code lets them grow.
    pin_norms: bool = False
    # Step scale-free weights at lr * init_scale (main Adam and iGA's inner Adam): Adam
    # moves every coordinate by about lr, so at a smaller norm the same lr turns the
    # weight by a larger angle; this keeps the angle per step of the default scale.
    relative_lr: bool = False
    iga: IgaConfig = IgaConfig()
    maml: MamlConfig = MamlConfig()
    replay: ReplayConfig = ReplayConfig()


@dataclass(frozen=True)
class EvalConfig:
    """Few-shot evaluation: fine-tune the whole network on the support set, score the queries."""

    ways: int = 5
    shots: int = 1  # 1 and 5 in the paper
    queries: int = 15
    episodes: int = 600  # episode_test
    steps: int = 10  # test_inner_update_num
    lr: float = 0.01  # inner_lr

    def __post_init__(self) -> None:
        if min(self.ways, self.shots, self.queries, self.episodes, self.steps) < 1:
            raise ConfigError("ways, shots, queries, episodes and steps must be at least 1")
