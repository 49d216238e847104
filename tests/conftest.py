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
    # address="local": always a new cluster of our own, even when another process on this machine left
    # a `ray start` cluster behind (ray.init() would join it, and refuses num_cpus when joining).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_app(ray_local, tmp_path_factory):
    """The Serve application on the shared local cluster, with the toy model and a small catalog.

    Yields a namespace: `url` (loopback), `catalog` (its root), `ids` (name -> catalog id), `settings`.
    Sized for tests: generator with num_cpus=0 (does not block other Ray tests), one torch thread,
    a queue of 16 jobs.
    """
    import socket
    from types import SimpleNamespace

    from ray import serve
    from serve_support import build_test_catalog

    from serve.app import application
    from serve.settings import ServeSettings

    root = tmp_path_factory.mktemp("serve")
    catalog_root, ids = build_test_catalog(root)
    with socket.socket() as probe:  # a free loopback port for Serve's HTTP proxy
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(base="toy", catalog=str(catalog_root), device="cpu", threads=1, generator_cpus=0,
                             queue_limit=16, max_batch_size=8, batch_wait_s=0.05, host="127.0.0.1", port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(settings), name="md-test", route_prefix="/")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", catalog=catalog_root, ids=ids, settings=settings,
                              root=root)
    finally:
        serve.shutdown()
