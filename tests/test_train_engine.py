"""Engines: fp16 loss scaling, and DeepSpeed ZeRO-2 giving the torch engine's LoRA weights."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train_loop import make_config, metrics, weights
from torch import nn

from motiondirector.config import OptimizerSection
from motiondirector.events import TrainStep
from motiondirector.train.engine import LossScaler, TorchEngine
from motiondirector.train.layout import RunLayout
from motiondirector.train.loop import TrainingInterrupted, train
from motiondirector.train.synthetic import synthetic_records


def test_loss_scaler_skips_overflowing_steps_and_adapts_its_scale():
    scaler = LossScaler(True, initial=8.0, growth_interval=2)
    assert scaler.unscale({"a": [torch.tensor([8.0, 16.0])]})["a"][0].tolist() == [1.0, 2.0]
    assert scaler.unscale({"a": [torch.ones(1)]}) is not None and scaler.scale == 16.0  # two good steps: grow
    assert scaler.unscale({"a": [torch.ones(1)], "b": [torch.tensor([float("inf")])]}) is None and scaler.scale == 8.0
    disabled = LossScaler(False)
    assert disabled.scale == 1.0 and disabled.unscale({"a": [torch.tensor([float("inf")])]}) is not None


def test_an_overflowing_fp16_step_moves_nothing():
    weight = nn.Parameter(torch.ones(3))
    engine = TorchEngine()
    engine.prepare({"temporal": {"temporal": [weight]}}, OptimizerSection(weight_decay=0.1), fp16_loss_scaling=True)
    assert engine.step({"temporal": [torch.full((3,), float("inf"))]}) == []
    assert torch.equal(weight.detach(), torch.ones(3)) and engine.scaler.scale == 2.0 ** 15
    assert engine.step({"temporal": [torch.full((3,), engine.scaler.scale)]}) == ["temporal"]
    assert not torch.equal(weight.detach(), torch.ones(3))


def test_deepspeed_zero2_matches_the_torch_engine_and_resumes(tiny_backbone, tmp_path):
    """Tolerance: |DeepSpeed − torch| ≤ 1e-6 per weight after 4 steps (same AdamW; in practice exact).

    Two videos and spatial skips make some adapters sit steps out, which DeepSpeed must not step;
    the DeepSpeed run is interrupted at step 2 and resumed, restoring its ZeRO optimizer state.
    """
    records = synthetic_records(tiny_backbone, videos=2)
    overrides = ("steps=4", "spatial_skip_probability=0.5", "optimizer.weight_decay=0.1", "seed=0")
    train(make_config(*overrides), tmp_path / "torch", backbone=tiny_backbone, records=records)
    updated = [set(entry["updated"]) for entry in metrics(tmp_path / "torch")]
    # some spatial LoRA that already has optimizer state sits a step out
    assert any(name in set().union(*updated[:i]) - now for i, now in enumerate(updated) for name in ("spatial_0", "spatial_1"))

    deepspeed = make_config(*overrides, "engine.kind=deepspeed", "engine.zero_stage=2")

    def interrupt_at_step_2(event):
        if isinstance(event, TrainStep) and event.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "deepspeed"
    with pytest.raises(TrainingInterrupted):
        train(deepspeed, out, backbone=tiny_backbone, records=records, observers=[interrupt_at_step_2])
    assert RunLayout(out).checkpoint_steps() == [2]
    summary = train(deepspeed, out, resume=True, backbone=tiny_backbone, records=records)
    assert summary.resumed_from == 2

    expected, got = weights(tmp_path / "torch"), weights(out)
    assert expected.keys() == got.keys() == {"temporal", "spatial/0", "spatial/1"}
    for name in expected:
        for key, tensor in expected[name].items():
            torch.testing.assert_close(got[name][key], tensor, rtol=0, atol=1e-6, msg=f"{name}: {key}")

