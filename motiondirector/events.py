"""Events the library emits instead of drawing on a terminal (docs/api.md).

Long work (training, generation, caching, ingest) reports what happens to *observers*: plain
callables taking one event. The CLI attaches rich progress bars and TensorBoard, Ray Train an
observer that calls `ray.train.report`, Serve one that updates a job's status, tests a `Recorder`.
The library itself imports neither rich nor tensorboard.

An observer must not raise: an exception from it propagates and stops the work that emitted it
(which is how a test hook can stop a run at a given step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Progress:
    """A unit of some phase finished: `done` of `total` (e.g. phase "sample", "noise_prior", "cache")."""

    phase: str
    done: int
    total: int
    label: str = ""  # what the phase works on, e.g. "video 1/3" or a file name


@dataclass(frozen=True)
class TrainStarted:
    out_dir: str
    start_step: int  # 0, or the checkpoint step a resumed run continues from
    total_steps: int
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class TrainStep:
    step: int
    total_steps: int
    losses: dict[str, float]  # loss_spatial / loss_temporal / loss_org / loss_ad, those computed
    steps_per_second: float  # since this call of train() started stepping
    metrics: dict[str, Any] = field(default_factory=dict)  # the full metrics.jsonl entry of the step


@dataclass(frozen=True)
class CheckpointWritten:
    step: int
    path: Path  # the checkpoint folder (complete: written under a temporary name, then renamed)


@dataclass(frozen=True)
class ValidationSample:
    step: int
    prompt: str
    files: dict[str, Path]  # mp4 / gif


@dataclass(frozen=True)
class TrainFinished:
    out_dir: str
    steps: int
    losses: dict[str, float]
    seconds: float


Event = Progress | TrainStarted | TrainStep | CheckpointWritten | ValidationSample | TrainFinished
Observer = Callable[[Event], None]


def emit(observers: Iterable[Observer], event: Event) -> None:
    for observer in observers:
        observer(event)


def progress_callback(observers: Sequence[Observer], phase: str, label: str = "") -> Callable[[int, int], None]:
    """An `on_step(done, total)` callback that emits Progress events (for the sampler's loops)."""
    return lambda done, total: emit(observers, Progress(phase, done, total, label))


class Recorder:
    """An observer that keeps every event (tests, and callers that read events afterwards)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]
