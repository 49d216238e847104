"""Shared fixtures: one tiny model folder per session, reference data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.exists():
        pytest.fail(f"reference data not found at {REFERENCE} (expected ../shared beside the checkout)")
    return REFERENCE


@pytest.fixture(scope="session")
def car_turn(reference_dir) -> Path:
    return reference_dir / "car_turn" / "car-turn.mp4"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init model folder of the real UNet3D architecture (built offline, ~1.3 M UNet params)."""
    from motiondirector.backbones.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture()
def tiny_backbone(tiny_model_dir):
    """A fresh load per test: tests inject adapters, so sharing one instance would leak state."""
    from motiondirector.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone(str(tiny_model_dir), "cpu")


@pytest.fixture(scope="session")
def ray_local():
    """The one local Ray cluster of the test session (start-up ~10 s, so never per test or per module).

    Works with Ray's default token authentication and with RAY_AUTH_MODE=disabled alike.
    """
    import ray

    if ray.is_initialized():  # e.g. a test connected on its own: share it rather than fail
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
