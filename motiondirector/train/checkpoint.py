"""Writing and reading a run's LoRA packages and checkpoints (layout: train/layout.py, docs/run-folder.md).

A checkpoint is written into a hidden temp folder (packages first, `training_state.pt` last) and
renamed to `checkpoints/step-<n>`; `RunLayout.checkpoint_steps` only lists folders with a training
state, so a crash mid-write never yields a checkpoint that looks complete.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from motiondirector.lora.inject import adapter_state_dict, load_adapter_weights
from motiondirector.lora.package import (
    Manifest,
    PackageError,
    read_package,
    write_package,
)
from motiondirector.storage import atomic_write, staged_folder
from motiondirector.train.layout import RunLayout
from motiondirector.train.plan import AdapterPlan, AdapterSpec

STATE_FORMAT = 1


def package_folder(layout: RunLayout, adapter: AdapterSpec) -> Path:
    return layout.temporal if adapter.index is None else layout.spatial(adapter.index)


def write_packages(layout: RunLayout, model: nn.Module, plan: AdapterPlan,
                   manifest_for: Callable[[AdapterSpec], Manifest]) -> dict[str, Path]:
    """One package per adapter of the plan; returns {adapter name: folder}."""
    return {adapter.name: write_package(package_folder(layout, adapter), adapter_state_dict(model, adapter.name),
                                        manifest_for(adapter))
            for adapter in plan.adapters}


def load_packages(layout: RunLayout, model: nn.Module, plan: AdapterPlan,
                  expected_fingerprints: Callable[[AdapterSpec], list[str]]) -> None:
    """Load a checkpoint's packages into the plan's adapters, refusing packages trained on other data."""
    for adapter in plan.adapters:
        folder = package_folder(layout, adapter)
        manifest, state = read_package(folder)
        if manifest.data_fingerprints != expected_fingerprints(adapter):
            raise PackageError(f"{folder}: was trained on other data than the current dataset gives "
                               f"(the clips' fingerprints differ); start a new run or restore the data")
        load_adapter_weights(model, adapter.name, state)


def write_checkpoint(layout: RunLayout, step: int, write_run_packages: Callable[[RunLayout], object],
                     state: dict[str, Any]) -> Path:
    """checkpoints/step-<step>: the packages, then training_state.pt, then the rename that publishes it."""
    final = layout.checkpoint(step).root
    # replace: an older checkpoint of this step (a resumed run passing it again) gives way
    with staged_folder(final, replace=True) as staging:
        temp = RunLayout(staging)
        write_run_packages(temp)
        buffer = io.BytesIO()
        torch.save({"format": STATE_FORMAT, **state}, buffer)
        atomic_write(temp.training_state, buffer.getvalue())
    return final


def read_training_state(layout: RunLayout) -> dict[str, Any]:
    path = layout.training_state
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read the training state ({type(error).__name__}: {error})") from None
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: training state format {state.get('format')!r}, this version reads "
                         f"{STATE_FORMAT}")
    return state
