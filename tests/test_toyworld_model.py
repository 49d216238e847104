"""The embedded `toy` model: ships with the package, loads offline by name, samples the right shapes."""

from __future__ import annotations

import json

import torch

from motiondirector.backbones import embedded_models, load_backbone
from motiondirector.sample import SamplingSettings
from motiondirector.toyworld.render import HELD_OUT_MOTION, world_words


def test_toy_model_is_small_and_records_its_recipe():
    folder = embedded_models()["toy"]
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert 0 < weights <= 25 * 2**20
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["held_out_motion"] == HELD_OUT_MOTION and recipe["denoiser_steps"] > 0
    stages = {stage["name"]: stage for stage in recipe["stages"]}
    assert stages["zero-SNR v-prediction continuation"]["steps"] > 0  # the v2 stage ran on top of v1
    assert recipe["denoiser_steps"] == sum(stage["steps"] for stage in recipe["stages"])
    assert json.loads((folder / "motiondirector.json").read_text())["defaults"] == {
        "frames": 8, "height": 32, "width": 32, "fps": 8, "steps": 20, "guidance": 6.0}


def test_toy_model_has_a_zero_terminal_snr_v_prediction_schedule():
    backbone = load_backbone("toy", "cpu")
    config = backbone.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    assert float(backbone.scheduler.alphas_cumprod[-1]) < 1e-8  # t = T carries nothing of the clip
    backbone.scheduler.set_timesteps(20)
    assert int(backbone.scheduler.timesteps[0]) == 999


def test_toy_model_loads_offline_and_samples(monkeypatch):
    from motiondirector.toyworld.evaluate import generate_scenes
    from motiondirector.toyworld.render import Scene

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_backbone("toy", "cpu")
    assert backbone.model_id == "toy" and backbone.unet.config.in_channels == 4
    tokens = backbone.tokenizer(list(world_words()), add_special_tokens=False).input_ids
    assert all(len(ids) == 1 for ids in tokens)
    settings = SamplingSettings(steps=2, guidance=6.0, frames=8, height=32, width=32)
    frames = generate_scenes(backbone, [Scene("red", "square", "grey", "left")], [0], settings)
    assert frames.shape == (1, 8, 32, 32, 3) and torch.isfinite(frames).all()
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
