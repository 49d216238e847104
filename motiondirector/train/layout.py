"""The one run-folder layout (documented in docs/run-folder.md).

    OUT/config.yaml                 the validated training config, as run
    OUT/temporal/                   LoRA package (motion)            } final weights
    OUT/spatial/<k>/                LoRA package per spatial LoRA k  }
    OUT/checkpoints/step-<n>/       same packages + training_state.pt (optimizers, step, RNG)
    OUT/metrics.jsonl               one JSON object per logged step
    OUT/tensorboard/                TensorBoard event files
    OUT/samples/                    validation videos (mp4 + gif)
    OUT/summary.json                written last on success: the run is complete

A LoRA reference `RUN@step-<n>` names the packages of checkpoint n.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINING_STATE = "training_state.pt"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def temporal(self) -> Path:
        return self.root / "temporal"

    def spatial(self, index: int) -> Path:
        return self.root / "spatial" / str(index)

    def spatial_indices(self) -> list[int]:
        folder = self.root / "spatial"
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def checkpoint(self, step: int) -> RunLayout:
        """A checkpoint folder has the same package layout as the run itself."""
        return RunLayout(self.checkpoints / f"step-{step}")

    def checkpoint_steps(self) -> list[int]:
        """Steps of complete checkpoints (their training state is written last), ascending."""
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for folder in self.checkpoints.iterdir():
            match = _STEP_DIR.match(folder.name)
            if match and (folder / TRAINING_STATE).exists():
                steps.append(int(match.group(1)))
        return sorted(steps)

    @property
    def training_state(self) -> Path:
        return self.root / TRAINING_STATE


def split_reference(reference: str) -> tuple[Path, int | None]:
    """`RUN@step-<n>` -> (RUN, n); a plain path -> (path, None)."""
    if "@" in reference:
        path, _, suffix = reference.rpartition("@")
        match = _STEP_DIR.match(suffix)
        if not match:
            raise ValueError(f"{reference!r}: a checkpoint reference looks like RUN@step-<n>")
        return Path(path), int(match.group(1))
    return Path(reference), None
