"""Screening of a submitted teacher before it joins the pool (issue 13, DESIGN.md section 2).

A model that parses and runs can still harm every owner's release: random weights, labels
permuted, a constant answer, another domain, a backdoor trigger. `screen_teacher` measures,
with the engine's own tools, what such a model cannot fake, and `judge` turns the figures
into accept, hold (for the operator) or refuse, with the test and the figure named.
"""

from free_common.screening.config import ScreeningConfig
from free_common.screening.screen import (
    ScreeningContext,
    ScreeningReport,
    judge,
    neutral_images,
    screen_teacher,
)

__all__ = [
    "ScreeningConfig",
    "ScreeningContext",
    "ScreeningReport",
    "judge",
    "neutral_images",
    "screen_teacher",
]
