"""The CLI's observers of the library's events (motiondirector/events.py): rich bars and TensorBoard.

The library only emits events; drawing bars and writing TensorBoard files is the terminal's and the
run folder's business, so it lives here, on the CLI floor:

- `RichProgress`: a training bar (steps, it/s, ETA, the step's losses) and one bar per `Progress`
  phase and label (caching clips, noise-prior inversion, sampling each video), on stderr.
- `TensorBoardScalars`: `train/<loss>` scalars into the run's `tensorboard/` folder, on rank 0.

Use both as context managers around the library call, so bars and event files are closed even when
the call raises (e.g. an interrupted training run).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from motiondirector.api import Event, TrainFinished, TrainStarted, TrainStep
from motiondirector.api import Progress as ProgressEvent

# Shown on each phase bar: "<phase> <label>"; the training bar says "train".
_PHASE_NAMES = {"cache": "caching", "noise_prior": "noise prior (DDIM inversion)", "sample": "sampling"}


def losses_text(losses: dict[str, float]) -> str:
    """`{"loss_spatial": 0.1, ...}` -> "spatial 0.1000  temporal ..." (the bar's and summaries' form)."""
    return "  ".join(f"{key.removeprefix('loss_')} {value:.4f}" for key, value in losses.items())


class RichProgress:
    """Rich progress bars on stderr for training steps and every Progress phase."""

    def __init__(self, console: Console | None = None, *, enabled: bool = True) -> None:
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                             TextColumn("{task.fields[losses]}"),
                             console=console or Console(stderr=True), disable=not enabled)
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.bars.stop()

    def _task(self, key: tuple[str, str], description: str, total: int, completed: int = 0) -> TaskID:
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(description, total=total, completed=completed, rate="", losses="")
        return self.tasks[key]

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStarted):
            if event.rank == 0:
                task = self._task(("train", event.out_dir), "train", event.total_steps, event.start_step)
                self.bars.update(task, total=event.total_steps, completed=event.start_step)
        elif isinstance(event, TrainStep):
            task = next((t for (phase, _), t in self.tasks.items() if phase == "train"), None)
            if task is not None:
                self.bars.update(task, completed=event.step, rate=f"{event.steps_per_second:.2f} it/s",
                                 losses=losses_text(event.losses))
        elif isinstance(event, TrainFinished):
            for (phase, _), task in list(self.tasks.items()):
                if phase == "train":
                    self.bars.remove_task(task)
            self.tasks = {key: task for key, task in self.tasks.items() if key[0] != "train"}
        elif isinstance(event, ProgressEvent):
            name = _PHASE_NAMES.get(event.phase, event.phase)
            task = self._task((event.phase, event.label), f"{name} {event.label}".strip(), event.total)
            self.bars.update(task, total=event.total, completed=event.done)
            if event.done >= event.total:  # a finished phase leaves the screen; the next one gets its bar
                self.bars.remove_task(task)
                del self.tasks[(event.phase, event.label)]


class TensorBoardScalars:
    """`train/<loss>` scalars of rank 0's logged steps (every `every`-th and the last) in OUT/tensorboard.

    Opened at TrainStarted with purge_step = the resumed step + 1, which drops the events that an
    interrupted or crashed attempt logged after its last checkpoint.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.writer: Any = None

    def __enter__(self) -> TensorBoardScalars:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStarted) and event.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            from motiondirector.api import RunLayout

            self.close()
            self.writer = SummaryWriter(str(RunLayout(Path(event.out_dir)).tensorboard),
                                        purge_step=event.start_step + 1)
        elif isinstance(event, TrainStep) and self.writer is not None:
            if event.step % self.every == 0 or event.step == event.total_steps:
                for key, value in event.losses.items():
                    self.writer.add_scalar(f"train/{key}", value, event.step)
        elif isinstance(event, TrainFinished):
            self.close()
