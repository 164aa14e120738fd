"""Model selection on meta-validation classes only.

The official code (and PURER, BiDf-MKD) reports the best of periodic meta-TEST scores,
which selects the model on the test split. Here the best initialization is chosen on
meta-val results, and a result from any other split is refused, so the reported
meta-test number belongs to a model chosen without seeing it.
"""

from __future__ import annotations

from torch import Tensor, nn

from free_common.errors import EngineError
from free_common.meta.evaluate import EvalResult

__all__ = ["VALIDATION_SPLIT", "ValidationSelector"]

VALIDATION_SPLIT = "meta-val"


class ValidationSelector:
    """Keeps a copy of the model state with the best meta-val accuracy so far."""

    def __init__(self) -> None:
        self.best: EvalResult | None = None
        self.best_step: int | None = None
        self.state: dict[str, Tensor] | None = None

    def offer(self, result: EvalResult, model: nn.Module, step: int) -> bool:
        """Keep `model`'s state if `result` beats the best so far; True when it does.

        Raises
        ------
        EngineError
            `result` is not from the meta-val split.
        """
        if result.split != VALIDATION_SPLIT:
            raise EngineError(
                f"model selection reads {VALIDATION_SPLIT} results only, got {result.split!r}: "
                "evaluate on meta-val to choose, on meta-test only to report"
            )
        if self.best is not None and result.mean <= self.best.mean:
            return False
        self.best, self.best_step = result, step
        self.state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        return True
