"""Timestep emphasis (`timesteps:`) and the loss-divergence guard (`divergence:`) of the training loop."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from motiondirector.config import ConfigError, apply_overrides, validate_config
from motiondirector.train.guard import DivergenceGuard, TimestepSampler, TrainingDiverged
from motiondirector.train.loop import train
from motiondirector.train.step import draw_step
from motiondirector.train.synthetic import synthetic_records

BASE = {"base": "tiny", "device": "cpu", "steps": 3, "lora": {"rank": 4}, "data": {"sources": "synthetic.mp4"},
        "gradient_checkpointing": False, "checkpoint_every": 0, "mixed_precision": "no", "optimizer": {"lr": 1e-3},
        "mode": "coupled"}


def make_config(*overrides: str):
    return validate_config(apply_overrides(BASE, overrides), "test config")


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- timesteps -------------------------------------------------------------------------------

def test_no_emphasis_draws_exactly_as_before():
    """Defaults must not change any run: the same draws and the same generator state afterwards."""
    shapes = [(1, 4, 2, 4, 4)] * 2
    plain, sampled = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        a = draw_step(plain, shapes, 1000, 0.2)
        b = draw_step(sampled, shapes, 1000, 0.2, timesteps=TimestepSampler(1000))
        assert (a.record, a.timestep, a.skip_spatial, a.frame, a.anchor) == (
            b.record, b.timestep, b.skip_spatial, b.frame, b.anchor)
        assert torch.equal(a.noise, b.noise)
    assert torch.equal(plain.get_state(), sampled.get_state())


def test_high_share_draws_from_the_high_range():
    generator = torch.Generator().manual_seed(0)
    half = TimestepSampler(1000, high_share=0.5, high_from=800)
    draws = [half.draw(generator) for _ in range(2000)]
    assert min(draws) >= 0 and max(draws) < 1000
    # Half the steps from [800, 1000), the other half uniform (a fifth of which also lands there): 60%.
    assert 0.56 < sum(t >= 800 for t in draws) / len(draws) < 0.64
    assert all(TimestepSampler(1000, 1.0, 950).draw(generator) >= 950 for _ in range(200))
    with pytest.raises(ValueError, match="timesteps.high_from"):
        TimestepSampler(1000, 0.5, 1000)
    with pytest.raises(ConfigError, match="timesteps.high_share"):
        make_config("timesteps.high_share=1.5")


def test_training_on_the_highest_timesteps_of_a_zero_snr_v_model(tmp_path):
    """t in [990, 1000) includes SNR 0 (t = 999), where the v target is −x0: losses stay finite."""
    from motiondirector.backbones import load_backbone
    from motiondirector.backbones.tiny import TinyModelConfig, write_tiny_model

    config = TinyModelConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")
    backbone = load_backbone(str(write_tiny_model(tmp_path / "v", config)), "cpu")
    summary = train(make_config("steps=6", "timesteps.high_share=1", "timesteps.high_from=990"), tmp_path / "run",
                    backbone=backbone, records=synthetic_records(backbone))
    entries = logged(tmp_path / "run")
    assert len(entries) == 6 and all(990 <= e["timestep"] < 1000 for e in entries)
    assert all(0 < e["loss_org"] < 100 for e in entries) and summary.steps == 6


# --- divergence ------------------------------------------------------------------------------

def test_guard_compares_the_recent_mean_with_the_early_mean():
    guard = DivergenceGuard(factor=5.0, window=4, hint="; lower it")
    healthy = [0.07, 0.06, 0.065, 0.06] + [0.05, 0.2, 0.04, 0.06] * 3  # noisy, never 5x the start on average
    for step, value in enumerate(healthy, 1):
        assert guard.observe(step, {"loss_org": value, "loss_spatial": 0.1}) is None
    for step, value in enumerate([0.3, 0.6, 0.63, 0.7], len(healthy) + 1):
        error = guard.observe(step, {"loss_org": value, "loss_spatial": 0.1})
        if error is not None:
            break
    assert isinstance(error, TrainingDiverged)
    assert error.loss == "loss_org" and error.step == len(healthy) + 3  # recent mean (0.06+0.3+0.6+0.63)/4 > 5 × 0.0638
    text = str(error)
    assert "loss_org" in text and "early mean 0.06375" in text and f"step {error.step}" in text
    assert text.endswith("; lower it")
    # State round trip (checkpoints): a restored guard decides the same.
    restored = DivergenceGuard(factor=5.0, window=4)
    restored.load_state_dict(guard.state_dict())
    assert isinstance(restored.observe(99, {"loss_org": 0.7}), TrainingDiverged)
    off = DivergenceGuard(factor=5.0, window=1, enabled=False)
    assert off.observe(1, {"loss_org": float("nan")}) is None


def test_huge_learning_rate_stops_the_run_and_the_guard_can_be_switched_off(tiny_backbone, tmp_path):
    records = synthetic_records(tiny_backbone)
    # Measured on the tiny model: lr 15 turns the loss to NaN after ~4 steps (lr ≤ 3 stays near 1).
    with pytest.raises(TrainingDiverged, match=r"loss_org .*lower optimizer.lr \(now 15\) or lora.rank \(now 4\)"):
        train(make_config("steps=30", "optimizer.lr=15", "divergence.window=3"), tmp_path / "huge",
              backbone=tiny_backbone, records=records)
    assert not (tmp_path / "huge" / "summary.json").exists()  # the run is not reported as complete
    summary = train(make_config("steps=8", "optimizer.lr=15", "divergence.window=3", "divergence.enabled=false"),
                    tmp_path / "off", backbone=tiny_backbone, records=records)
    assert summary.steps == 8


def test_cli_exits_1_with_the_divergence_message(tiny_model_dir, tmp_path):
    from pathlib import Path

    from motiondirector.cli import app

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_car_turn.yaml"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), "--cache-dir",
                                      str(tmp_path / "cache"), "--set", f"base={tiny_model_dir}", "--set", "steps=30",
                                      "--set", "optimizer.lr=15", "--set", "divergence.window=3",
                                      "--set", "validation.every=0", "--set", "checkpoint_every=0"])
    assert result.exit_code == 1, result.output
    assert "training diverged at step" in " ".join(result.output.split())
