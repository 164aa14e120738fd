"""Build configurations of the glyph benchmark, one per size.

``small`` (tests, demo): the ``small`` Debian package set, classes with at least 10
distinct instances, at most 20 kept per class. Ten is what a dozen font packages
allow for Greek, Armenian and Hebrew; 5-way 1-shot episodes with up to 9 queries work.

``benchmark``: the ``benchmark`` package set ("tier A"), at least 20 distinct
instances per class (as Omniglot has 20 drawings per character), at most 40 kept,
and at most 600 classes tried per script so Han does not swamp meta-train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from free_common.data.debian_packages import PACKAGE_SETS, font_packages
from free_common.data.glyphs_audit import AuditSpec
from free_common.data.glyphs_lookalike import LookalikeSpec
from free_common.data.glyphs_render import RenderSpec
from free_common.errors import ConfigError

__all__ = ["BUILDER_VERSION", "SIZES", "GlyphBuildConfig", "size_config"]

BUILDER_VERSION = 1
"""Bumped whenever the same fonts and configuration would give different arrays."""


@dataclass(frozen=True)
class GlyphBuildConfig:
    """Everything that decides the content of a glyph set, besides the fonts themselves."""

    size: str
    packages: tuple[str, ...]
    min_instances: int
    max_instances: int | None
    max_classes_per_script: int | None
    near_duplicate_px: int = 40
    seed: int = 0
    render: RenderSpec = field(default_factory=RenderSpec)
    lookalike: LookalikeSpec = field(default_factory=LookalikeSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)

    def __post_init__(self) -> None:
        if self.min_instances < 1:
            raise ConfigError(f"min_instances must be >= 1, got {self.min_instances}")
        if self.max_instances is not None and self.max_instances < self.min_instances:
            raise ConfigError(
                f"max_instances ({self.max_instances}) is below min_instances "
                f"({self.min_instances})"
            )

    def with_packages(self, packages: tuple[str, ...]) -> GlyphBuildConfig:
        """Return this configuration for another list of font packages."""
        return replace(self, size=f"{self.size}+custom", packages=tuple(sorted(set(packages))))

    def thresholds(self) -> dict[str, Any]:
        """Return the settings that shape the content, for the manifest."""
        document = asdict(self)
        del document["size"], document["packages"]
        return document


SIZES: dict[str, GlyphBuildConfig] = {
    "small": GlyphBuildConfig(
        size="small",
        packages=font_packages(PACKAGE_SETS["small"]),
        min_instances=10,
        max_instances=20,
        max_classes_per_script=None,
    ),
    "benchmark": GlyphBuildConfig(
        size="benchmark",
        packages=font_packages(PACKAGE_SETS["benchmark"]),
        min_instances=20,
        max_instances=40,
        max_classes_per_script=600,
    ),
}


def size_config(size: str) -> GlyphBuildConfig:
    """Return the configuration of a named size.

    Raises
    ------
    ConfigError
        For an unknown size.
    """
    try:
        return SIZES[size]
    except KeyError:
        raise ConfigError(
            f"unknown glyph set size {size!r}; use one of: {', '.join(SIZES)}"
        ) from None
