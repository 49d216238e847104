"""Guards of a training run: timestep emphasis for the step's draw, and the loss-divergence stop."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TimestepSampler:
    """Draws a step's timestep: with probability `high_share` from [high_from, T), else from [0, T).

    `high_share` 0 draws exactly as a plain `randint(T)` (one draw), so runs without emphasis keep
    their random streams; otherwise one uniform draw picks the range, then one integer draw.
    """

    num_timesteps: int
    high_share: float = 0.0
    high_from: int = 800

    def __post_init__(self) -> None:
        if self.high_share > 0 and not 0 <= self.high_from < self.num_timesteps:
            raise ValueError(f"timesteps.high_from: {self.high_from} is outside the base's "
                             f"{self.num_timesteps} training timesteps (0 ≤ high_from < {self.num_timesteps})")

    def draw(self, generator: torch.Generator) -> int:
        if self.high_share == 0:
            return int(torch.randint(self.num_timesteps, (1,), generator=generator))
        low = self.high_from if bool(torch.rand((), generator=generator) < self.high_share) else 0
        return low + int(torch.randint(self.num_timesteps - low, (1,), generator=generator))


class TrainingDiverged(RuntimeError):
    """A loss exploded: its recent mean is far above its early mean, or it stayed non-finite."""

    def __init__(self, message: str, *, step: int, loss: str) -> None:
        super().__init__(message)
        self.step, self.loss = step, loss


@dataclass
class DivergenceGuard:
    """Per loss: the mean of its first `window` finite values against the mean of its last `window`.

    Once both windows are full and disjoint, a recent mean above `factor` × the early mean stops the
    run; so do `window` non-finite values in a row. `hint` goes at the end of the message. `observe`
    returns the error instead of raising it, so that all ranks of a distributed run can stop together.
    """

    factor: float = 5.0
    window: int = 20
    enabled: bool = True
    hint: str = ""
    early: dict[str, list[float]] = field(default_factory=dict)
    recent: dict[str, deque[float]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)

    def observe(self, step: int, losses: dict[str, float]) -> TrainingDiverged | None:
        if not self.enabled:
            return None
        for key, value in losses.items():
            if not math.isfinite(value):
                self.non_finite[key] = self.non_finite.get(key, 0) + 1
                if self.non_finite[key] >= self.window:
                    return TrainingDiverged(
                        f"training diverged at step {step}: {key} was {value} for the last {self.window} steps"
                        f"{self.hint}", step=step, loss=key)
                continue
            self.non_finite[key] = 0
            self.seen[key] = self.seen.get(key, 0) + 1
            early = self.early.setdefault(key, [])
            if len(early) < self.window:
                early.append(value)
            recent = self.recent.setdefault(key, deque(maxlen=self.window))
            recent.append(value)
            if self.seen[key] < 2 * self.window:
                continue
            early_mean, recent_mean = sum(early) / len(early), sum(recent) / len(recent)
            if recent_mean > self.factor * early_mean:
                return TrainingDiverged(
                    f"training diverged at step {step}: {key} averaged {recent_mean:.4g} over its last "
                    f"{self.window} values, {recent_mean / early_mean:.1f}× its early mean {early_mean:.4g} "
                    f"(first {self.window} values; the limit is divergence.factor = {self.factor:g}){self.hint}",
                    step=step, loss=key)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"early": {k: list(v) for k, v in self.early.items()},
                "recent": {k: list(v) for k, v in self.recent.items()},
                "seen": dict(self.seen), "non_finite": dict(self.non_finite)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.early = {k: list(v) for k, v in state["early"].items()}
        self.recent = {k: deque(v, maxlen=self.window) for k, v in state["recent"].items()}
        self.seen, self.non_finite = dict(state["seen"]), dict(state["non_finite"])
