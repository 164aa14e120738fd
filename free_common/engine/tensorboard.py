"""TensorBoard event files of a meta round, written from the engine's events.

`TensorBoardLogger` is an event callback (`free_common.engine.events`): the engine's
loops stay as they are. Per step it writes the scalars

- ``train/replay_loss``: MAML replay's query loss (the meta-train loss);
- ``train/distill_loss``: the distillation loss of the step's iGA update (of the
  summed-gradient update without iGA);
- ``train/iga_alignment``: the mean cosine of the step's teachers' distillation
  gradients, what iGA's update raises implicitly (`free_common.meta.iga.DistillStats`);
- ``recovery/generator_loss``, ``recovery/seconds``, ``recovery/teacher_accuracy``;
- ``step/seconds``;

``meta_val/accuracy`` (and ``meta_val/ci95``) at each evaluation, and at each checkpoint
an image grid per teacher of its recovered images (``recovered/<teacher id>``: one row
per class, from the memory bank the checkpoint holds, `free_common.engine.recovered`).
Steps of a resumed round continue where the files stopped.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from free_common.engine.events import (
    CheckpointSaved,
    EngineEvent,
    Evaluated,
    RoundFinished,
    RoundStarted,
    StepFinished,
)
from free_common.engine.recovered import image_grid, read_recovered

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Writes a round's events to TensorBoard event files in `log_dir`.

    Parameters
    ----------
    log_dir
        Folder for the event files (made when missing); point ``tensorboard --logdir``
        at it or at a folder above it.
    images_per_class
        Recovered images per class in each grid.
    """

    def __init__(self, log_dir: Path, images_per_class: int = 8) -> None:
        self.log_dir = log_dir
        self._per_class = images_per_class
        self._writer = SummaryWriter(str(log_dir))

    def __call__(self, event: EngineEvent) -> None:
        """Write what `event` carries."""
        scalar = self._writer.add_scalar
        if isinstance(event, RoundStarted):
            scalar("round/teachers", event.teachers, event.start_step)
        elif isinstance(event, StepFinished):
            step = event.step
            for tag, value in (
                ("train/replay_loss", event.replay_loss),
                ("train/distill_loss", event.distill_loss),
                ("train/iga_alignment", event.alignment),
                ("recovery/generator_loss", event.generator_loss),
                ("recovery/seconds", event.recovery_seconds),
                ("recovery/teacher_accuracy", event.teacher_accuracy),
                ("step/seconds", event.seconds),
            ):
                if value is not None:
                    scalar(tag, value, step)
        elif isinstance(event, Evaluated):
            split = event.split.replace("-", "_")
            scalar(f"{split}/accuracy", event.mean, event.step)
            scalar(f"{split}/ci95", event.ci95, event.step)
        elif isinstance(event, CheckpointSaved):
            self._images(Path(event.path).parent, event.step)
        elif isinstance(event, RoundFinished):
            scalar("round/selected_step", event.selected_step, event.steps)
            self._writer.flush()

    def _images(self, checkpoint_dir: Path, step: int) -> None:
        recovered = read_recovered(checkpoint_dir, self._per_class)
        if recovered is None:
            return
        for teacher, classes in recovered.by_teacher.items():
            grid = image_grid([images for _key, images in classes])
            self._writer.add_image(f"recovered/{teacher}", grid, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event files."""
        self._writer.close()
