"""A release's meta-learner rebuilt from its manifest: architecture, weights, starting scale.

`free-client finetune` and `free-bench adapt` read a release folder
(`free_common.security.release_dir`) and rebuild its network here, or a random
initialization of the same architecture at the scale the release's training started
from: the baseline a release should beat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from free_common.engine.config import LearnerSpec
from free_common.engine.result import build_learner
from free_common.errors import ConfigError
from free_common.meta.baselines import random_init
from free_common.meta.norms import rescale_weights, scale_free_weights
from free_common.types import ReleaseManifest

__all__ = ["load_learner", "release_architecture", "release_init_scale"]


def release_init_scale(release: ReleaseManifest) -> float:
    """Return the scale the release's training started its network at (1 when not recorded).

    A random initialization to compare with is drawn at that scale: batch norm hides it
    from the forward pass, but fine-tuning at a fixed rate does not.
    """
    try:
        scale = json.loads(release.metrics_json).get("init_scale", 1.0)
    except (ValueError, AttributeError):
        return 1.0
    return float(scale) if isinstance(scale, int | float) and scale > 0 else 1.0


def release_architecture(release: ReleaseManifest) -> dict[str, Any]:
    """Return the meta-learner's architecture that the release's config describes.

    Raises
    ------
    ConfigError
        The release says nothing usable about its architecture.
    """
    try:
        config = json.loads(release.config_json)
    except ValueError:
        config = None
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(architecture, dict):
        raise ConfigError(
            f"release {release.version} does not describe its architecture: it cannot be"
            " fine-tuned here; fetch a release made by a current free-server"
        )
    return architecture


def load_learner(
    weights: Path | None, architecture: dict[str, Any], *, seed: int = 0, init_scale: float = 1.0
) -> tuple[nn.Module, LearnerSpec]:
    """Rebuild a release's meta-learner from its manifest's architecture.

    Parameters
    ----------
    weights
        The release's ``meta.safetensors``; None draws a random initialization of
        the same architecture from `seed` (the baseline a release should beat).
    architecture
        ``config["architecture"]`` of the release manifest.
    seed
        Seeds the random initialization (only read when `weights` is None).
    init_scale
        Scale of the random initialization's scale-free weights: the release's own start
        (its ``init_scale`` metric), so the baseline differs from it in training only.

    Raises
    ------
    ConfigError
        The architecture or the weights cannot be loaded.
    """
    where = "the release" if weights is None else f"the release in {weights.parent}"
    try:
        spec = LearnerSpec(**architecture)
        model = random_init(lambda: build_learner(spec), seed)
        if weights is not None:
            model.load_state_dict(load_file(str(weights)))
        else:
            rescale_weights(model, scale_free_weights(model), init_scale)
    except (TypeError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"{where} cannot be loaded: {exc}") from None
    return model, spec
