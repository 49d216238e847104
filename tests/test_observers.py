"""The library reports to observers instead of drawing: no rich/tensorboard below the CLI, and train()'s events."""

from __future__ import annotations

import ast
from pathlib import Path

from test_train_loop import make_config, metrics

from motiondirector.events import (
    CheckpointWritten,
    Recorder,
    TrainFinished,
    TrainStarted,
    TrainStep,
    ValidationSample,
)
from motiondirector.train.loop import train
from motiondirector.train.synthetic import synthetic_records

PACKAGE = Path(__file__).resolve().parents[1] / "motiondirector"
TERMINAL_AND_TENSORBOARD = ("rich", "tensorboard", "tensorboardX", "torch.utils.tensorboard")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_below_the_cli_imports_neither_rich_nor_tensorboard():
    offenders = {}
    library = [p for p in PACKAGE.rglob("*.py")
               if p.relative_to(PACKAGE).parts[0] not in ("commands", "cli.py")]
    assert len(library) > 40  # the walk found the package
    for path in library:
        bad = {name for name in imported_modules(path)
               if any(name == banned or name.startswith(banned + ".") for banned in TERMINAL_AND_TENSORBOARD)}
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert offenders == {}
    # the check itself sees such imports (the CLI's observers have both)
    assert {"rich.progress", "torch.utils.tensorboard"} <= imported_modules(PACKAGE / "commands" / "observers.py")


def test_train_emits_started_steps_checkpoints_samples_finished(tiny_backbone, tmp_path):
    config = make_config("steps=5", "checkpoint_every=2", "validation.every=4", "validation.steps=1",
                         "validation.frames=2", "validation.size=[32, 32]", "validation.prompts=[a test clip]")
    recorder = Recorder()
    out = tmp_path / "run"
    summary = train(config, out, backbone=tiny_backbone, records=synthetic_records(tiny_backbone, videos=2),
                    observers=[recorder])

    kinds = [type(event).__name__ for event in recorder.events]
    assert kinds == ["TrainStarted", "TrainStep", "TrainStep", "CheckpointWritten", "TrainStep", "TrainStep",
                     "CheckpointWritten", "ValidationSample", "TrainStep", "CheckpointWritten", "ValidationSample",
                     "TrainFinished"]
    started = recorder.of(TrainStarted)[0]
    assert (started.out_dir, started.start_step, started.total_steps, started.rank, started.world_size) == \
        (str(out), 0, 5, 0, 1)
    steps = recorder.of(TrainStep)
    assert [s.step for s in steps] == [1, 2, 3, 4, 5] and all(s.total_steps == 5 for s in steps)
    assert all(s.steps_per_second > 0 and {"loss_temporal", "loss_org", "loss_ad"} <= set(s.losses) for s in steps)
    # each step's metrics entry is the line metrics.jsonl got (log_every=1), losses included
    assert [s.metrics for s in steps] == metrics(out)
    assert all(s.metrics[key] == value for s in steps for key, value in s.losses.items())
    checkpoints = recorder.of(CheckpointWritten)
    assert [(c.step, c.path) for c in checkpoints] == [(n, out / "checkpoints" / f"step-{n}") for n in (2, 4, 5)]
    assert all((c.path / "training_state.pt").is_file() for c in checkpoints)
    samples = recorder.of(ValidationSample)
    assert [(s.step, s.prompt) for s in samples] == [(4, "a test clip"), (5, "a test clip")]
    assert all(sorted(s.files) == ["gif", "mp4"] and s.files["mp4"].stat().st_size > 0 for s in samples)
    finished = recorder.of(TrainFinished)[0]
    assert (finished.out_dir, finished.steps, finished.losses) == (str(out), 5, summary.losses)
    assert not (out / "tensorboard").exists()  # TensorBoard is the CLI's observer now
