"""Screening of a submitted teacher before it joins the pool (issue 13, DESIGN.md section 2).

A model that parses and runs can still harm every owner's release: random weights, labels
permuted, a constant answer, another domain, a backdoor trigger. `screen.screen_teacher`
measures, with the engine's own tools, what such a model cannot fake, and `screen.judge`
turns the figures into accept, hold (for the operator) or refuse, naming the test and
the figure. The package imports only its settings, so the server's configuration can
read them without loading torch.
"""

from free_common.screening.config import ScreeningConfig

__all__ = ["ScreeningConfig"]
